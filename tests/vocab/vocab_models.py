"""Tiny model families whose tokenizers differ: byte-level BPE (tokenizer.json) and SentencePiece
(tokenizer.model only), each expert adding tokens of its own to the base's."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from tiny_models import make_model

TEXTS = ["the cat sat on the mat", "hello world of tiny models", "numbers 123 and 456 add up",
         "merge the models now please", "a tokenizer splits text into tokens"] * 8


def bpe_tokenizer(path: Path, added: list[str] = (), special: list[str] = (), texts: list[str] = TEXTS,
                  vocab: int = 300):
    """A byte-level BPE tokenizer trained on ``texts``, with ``added`` then ``special`` tokens after
    its own, saved as tokenizer.json (a fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    _add(fast, added, special)
    fast.save_pretrained(path)
    return fast


def gpt2_files_tokenizer(path: Path, added: list[str] = (), special: list[str] = ()) -> int:
    """The byte-level BPE of ``bpe_tokenizer`` in GPT-2's file form: vocab.json and merges.txt, its
    added tokens in tokenizer_config.json, and no tokenizer.json. Returns the vocabulary size."""
    fast = bpe_tokenizer(path, added, special)
    fast.backend_tokenizer.model.save(str(path))  # vocab.json, merges.txt
    (path / "tokenizer.json").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return len(fast)


def sentencepiece_tokenizer(path: Path, added: list[str] = (), special: list[str] = ()) -> int:
    """A SentencePiece BPE model (tokenizer.model, no tokenizer.json: a "slow" tokenizer), its added
    tokens listed in tokenizer_config.json as transformers writes them. Returns the vocabulary size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=model, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    decoder = {}
    for i, token in enumerate([*added, *special]):
        decoder[str(size + i)] = {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": token in special}
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": False, "added_tokens_decoder": decoder}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return size + len(decoder)


def _add(tok, added, special) -> None:
    from transformers import AddedToken

    if added:
        tok.add_tokens(list(added))
    if special:
        tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in special])


def vocab_family(root: Path, kind: str = "bpe", experts: tuple[tuple[list[str], list[str]], ...] = (
        (["<tool>"], ["<|im_start|>"]), (["<math>"], ["<|im_start|>", "<|im_end|>"])),
        tied: bool = False) -> tuple[Path, list[Path]]:
    """A base model and one expert per entry of ``experts`` ((added, special) tokens beyond the base's):
    each expert is the base plus noise, its added tokens' rows its own. Models are float32 llamas."""
    def tokenizer(path: Path, added=(), special=()) -> int:
        if kind == "bpe":
            return len(bpe_tokenizer(path, list(added), list(special)))
        if kind == "gpt2":
            return gpt2_files_tokenizer(path, list(added), list(special))
        return sentencepiece_tokenizer(path, list(added), list(special))

    (root / "tok").mkdir(parents=True, exist_ok=True)
    size = tokenizer(root / "base_tok")
    base = make_model(root / "base", seed=0, layers=2, vocab=size, tied=tied, tokenizer=False)
    _copy_tokenizer(root / "base_tok", base)
    paths = []
    for i, (added, special) in enumerate(experts):
        size = tokenizer(root / f"tok{i}", added, special)
        path = make_model(root / f"expert{i}", seed=i + 1, layers=2, vocab=size, tied=tied, base=base,
                          tokenizer=False)
        _copy_tokenizer(root / f"tok{i}", path)
        paths.append(path)
    return base, paths


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def embeddings(path: Path) -> dict[str, torch.Tensor]:
    from tiny_models import load_state

    state = load_state(path)
    return {k: v for k, v in state.items() if "embed_tokens" in k or "lm_head" in k}
