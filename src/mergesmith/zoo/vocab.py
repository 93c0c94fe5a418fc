"""The zoo's vocabulary case: two experts with tokenizers of their own (docs/vocab.md, "In the benchmark").

- ``added``: the base tokenizer plus the ``ADDED_TOKENS`` most frequent words of ``ADDED_SKILL``'s
  train text that the base tokenizer splits into two or more pieces (each added with its leading
  space, as the words appear after the first one; none that begins another word of the text). The
  embedding and LM head grow by one row per word; each new row is the mean of the base's rows of the
  word's pieces (the usual initialisation, Hewitt 2021), then the model is fine-tuned on the skill
  exactly as that skill's expert is (same steps, same seeds).
- ``retokenized``: a byte-level BPE tokenizer trained afresh on the world's text (other documents
  than the zoo tokenizer's) with ``RETOKENIZED_VOCAB`` times the zoo's vocabulary size. The base gets
  it by ``tokensurgeon`` (orthogonal matching pursuit); OMP needs a donor with that tokenizer, so a
  donor model of the zoo's shape is pretrained from scratch with it for ``DONOR_STEPS`` of the base's
  pretraining steps (its embedding geometry is all OMP reads). Then the transplanted base is
  fine-tuned on ``RETOKENIZED_SKILL`` exactly as that skill's expert is.

Built on demand (``build_vocab_experts``), as the LoRA pool is, not by every ``zoo build``:
the tokenizer and donor depend on the world seed and sit beside the base; the two experts depend on
the fine-tune seed too (their training data order and initialisation are its, as every expert's)
and sit in the fine-tuning folder. Every folder is keyed by these settings.
"""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from mergesmith.checks import resolve_device
from mergesmith.extras import require_extras
from mergesmith.paths import OutputLock
from mergesmith.zoo import skills as S
from mergesmith.zoo.build import (TOKENIZER_DOCS, _corpus, _key, _load, _save, _seed_for, _stage, _train_examples,
                                  _world)
from mergesmith.zoo.model import ZooSize, count_parameters, get_size, make_model
from mergesmith.zoo.train import finetune, pretrain

ADDED_SKILL = "facts"  # its names of countries, cities and people split into several pieces
RETOKENIZED_SKILL = "wordprob"
ADDED_TOKENS = 32
RETOKENIZED_VOCAB = 1.5  # times the zoo's vocabulary size
DONOR_STEPS = 0.5  # of the base's pretraining steps
VOCAB_FORMAT = 1
KINDS = ("added", "retokenized")


def vocab_settings(size: ZooSize) -> dict:
    return {"format": VOCAB_FORMAT, "added_skill": ADDED_SKILL, "added_tokens": ADDED_TOKENS,
            "retokenized_skill": RETOKENIZED_SKILL, "retokenized_vocab": round(size.vocab_size * RETOKENIZED_VOCAB),
            "donor_steps": max(1, round(size.pretrain_steps * DONOR_STEPS))}


def skill_of(kind: str) -> str:
    return {"added": ADDED_SKILL, "retokenized": RETOKENIZED_SKILL}[kind]


# ----------------------------------------------------------------------------- added tokens


def split_words(tokenizer, examples: list[S.Example], k: int) -> list[str]:
    """The ``k`` most frequent words (with their leading space) of the examples' prompts and answers
    that ``tokenizer`` splits into two or more pieces and that begin no other word of the text (an
    added token is matched anywhere, inside a longer word too); ties broken by the word, so the list
    is fixed."""
    counts: Counter[str] = Counter()
    for ex in examples:
        text = ex.prompt + ex.answer
        counts.update(" " + w for w in text.split() if w.isalpha())
    ordered = sorted(counts)
    # a word that begins another (" In" of " India") would be matched inside it: left out
    prefixes = {w for w, after in zip(ordered, ordered[1:]) if after.startswith(w)}
    split = [(w, c) for w, c in counts.items()
             if w not in prefixes and len(tokenizer(w, add_special_tokens=False)["input_ids"]) >= 2]
    split.sort(key=lambda wc: (-wc[1], wc[0]))
    return [w for w, _ in split[:k]]


def add_tokens(model, tokenizer, words: list[str]) -> None:
    """Add ``words`` to ``tokenizer``, one row each to the model's embedding and LM head; a new row
    is the mean of the rows of the word's pieces under the old tokenizer."""
    from tokenizers import AddedToken

    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    old = len(tokenizer)
    tokenizer.add_tokens([AddedToken(w, normalized=False, single_word=False) for w in words])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            for i, ids in enumerate(pieces):
                matrix[old + i] = matrix[ids].mean(dim=0)


# ----------------------------------------------------------------------------- builds


def build_added(folder: Path, base: Path, size: ZooSize, seed: int, finetune_seed: int, progress: bool) -> None:
    """The base with ``ADDED_SKILL``'s split words added, fine-tuned on the skill as its expert is."""
    model, tokenizer = _load(base)
    examples = _train_examples(size, _world(size, seed), (ADDED_SKILL,), finetune_seed)
    words = split_words(tokenizer, examples, ADDED_TOKENS)
    add_tokens(model, tokenizer, words)
    role = f"expert:{ADDED_SKILL}"  # trained exactly as the skill's own expert: same seeds
    torch.manual_seed(_seed_for(finetune_seed, role))
    log = finetune(model, tokenizer, examples, steps=size.ft_steps, batch=size.ft_batch, lr=size.ft_lr,
                   seed=_seed_for(finetune_seed, role, "data"), desc="vocab:added", device=size.device,
                   progress=progress)
    _save(model.to("cpu"), tokenizer, folder, log,
          {"role": "vocab:added", "skills": [ADDED_SKILL], "finetune_seed": finetune_seed, "added_tokens": words})


def build_donor(folder: Path, size: ZooSize, seed: int, progress: bool) -> None:
    """A model of the zoo's shape pretrained from scratch with the retokenized tokenizer."""
    from mergesmith.zoo.tokenizer import train_tokenizer

    world = _world(size, seed)
    settings = vocab_settings(size)
    docs = S.pretraining_documents(world, size.mixture, _seed_for(seed, "retokenized-docs"))
    tokenizer = train_tokenizer(itertools.islice(docs, TOKENIZER_DOCS), settings["retokenized_vocab"])
    tokens = _corpus(tokenizer, size, world, _seed_for(seed, "retokenized-corpus"))
    torch.manual_seed(_seed_for(seed, "retokenized-donor-init"))
    model = make_model(size, tokenizer)
    log = pretrain(model, tokens, steps=settings["donor_steps"], batch=size.pretrain_batch, block=size.block,
                   lr=size.pretrain_lr, seed=_seed_for(seed, "retokenized-donor-data"), device=size.device,
                   progress=progress)
    _save(model.to("cpu"), tokenizer, folder, log, {"role": "vocab:donor", "parameters": count_parameters(model)})


def build_retokenized(folder: Path, base: Path, donor: Path, size: ZooSize, seed: int, finetune_seed: int,
                      progress: bool) -> None:
    """The base given the donor's tokenizer by tokensurgeon (OMP), fine-tuned on ``RETOKENIZED_SKILL``
    as its expert is."""
    from mergesmith.vocab.transplant import SurgeonOptions, tokensurgeon

    transplanted = folder / "transplanted"
    surgery = tokensurgeon(base, donor, transplanted, SurgeonOptions(approximation="omp", progress=False))
    model, tokenizer = _load(transplanted)
    examples = _train_examples(size, _world(size, seed), (RETOKENIZED_SKILL,), finetune_seed)
    role = f"expert:{RETOKENIZED_SKILL}"
    torch.manual_seed(_seed_for(finetune_seed, role))
    log = finetune(model, tokenizer, examples, steps=size.ft_steps, batch=size.ft_batch, lr=size.ft_lr,
                   seed=_seed_for(finetune_seed, role, "data"), desc="vocab:retokenized", device=size.device,
                   progress=progress)
    shutil.rmtree(transplanted)
    _save(model.to("cpu"), tokenizer, folder, log,
          {"role": "vocab:retokenized", "skills": [RETOKENIZED_SKILL], "finetune_seed": finetune_seed,
           "tokensurgeon": {k: surgery.report[k] for k in ("vocab_size", "shared_tokens", "tensors")
                            if k in surgery.report}})


def vocab_folders(zoo) -> dict[str, Path]:
    """Where ``build_vocab_experts`` puts the donor and the two experts of ``zoo`` (built or not)."""
    key = _key(vocab_settings(get_size(zoo.size)))
    return {"donor": zoo.base.parent / f"vocab-{key}" / "donor",
            "added": zoo.root / f"vocab-{key}" / "added",
            "retokenized": zoo.root / f"vocab-{key}" / "retokenized"}


def build_vocab_experts(zoo, device: Optional[str] = None, progress: bool = True) -> dict[str, Path]:
    """The ``added`` and ``retokenized`` experts of ``zoo`` (and the retokenized donor), building
    those missing; each is saved with its own tokenizer."""
    spec = get_size(zoo.size, resolve_device(device))
    folders = vocab_folders(zoo)
    if all(p.exists() for p in folders.values()):
        return {k: folders[k] for k in KINDS}
    require_extras("mergesmith bench --vocab", "zoo")
    timings: dict[str, float] = {}
    with OutputLock(zoo.base.parent, wait=True):  # as build_zoo: builds of this world take turns
        _stage(folders["donor"], "vocab:donor", lambda t: build_donor(t, spec, zoo.seed, progress), timings, progress)
        _stage(folders["added"], "vocab:added",
               lambda t: build_added(t, zoo.base, spec, zoo.seed, zoo.finetune_seed, progress), timings, progress)
        _stage(folders["retokenized"], "vocab:retokenized",
               lambda t: build_retokenized(t, zoo.base, folders["donor"], spec, zoo.seed, zoo.finetune_seed,
                                           progress), timings, progress)
    return {k: folders[k] for k in KINDS}
