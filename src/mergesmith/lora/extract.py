"""Extract a PEFT LoRA adapter from a fine-tune and its base: ``mergesmith extract-lora``.

For every changed linear weight (and, with ``embed_lora``, the embeddings):

    dW = W_ft - W_base = U S Vh,   k = min(max_rank, k_energy, #{S_i > sv_epsilon}),
    A = sqrt(S_k) Vh_k,  B = U_k sqrt(S_k)      (scale 1: lora_alpha = r)

with the SVD taken from the smaller side (``thin_svd``) in float32, and the relative error
``||dW - B A||_F / ||dW||_F = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)`` reported per module.
``k_energy`` is the fewest singular values that keep the share ``energy`` of sum S_i^2.

The options follow ``mergekit-extract-lora`` (mergekit 0.1.5): a changed embedding or LM head is
saved whole in ``modules_to_save`` unless ``embed_lora``; ``save_modules`` are saved whole; a
changed tensor that is not a matrix (norms) is saved whole too, unless ``skip_undecomposable``;
``include``/``exclude`` regular expressions are searched in module names. Differences from
mergekit: unchanged tensors get no module; a changed bias of an extracted module becomes
``lora_B.bias`` with ``lora_bias: true`` where every extracted module has a bias (PEFT's flag
is global and cannot fold a bias into a layer without one; otherwise the run stops and says how
to go on), while mergekit writes the tensor without the flag, so PEFT drops it; a grown vocabulary is refused (mergekit saves the larger embeddings, which do not load
into the base); deltas are taken in float32 (mergekit subtracts in the checkpoint's dtype).

Reading is streamed: one tensor of each model at a time, released after use. The adapter is
held in memory until it is written (its size, not the model's).
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mergesmith.checkpoint.layout import is_pre_layer, is_vocab_tensor
from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.errors import InputError
from mergesmith.lora.adapter import AdapterOutput, existing_output_problems, write_adapter
from mergesmith.lora.factors import (
    OVERSAMPLE,
    choose_rank,
    randomized_svd,
    residual_error,
    split_singular_values,
    thin_svd,
    truncation_error,
)
from mergesmith.paths import OutputLock, output_problems

LORA, SAVE, SKIP = "lora", "save", "skip"
SVD_CHOICES = ("auto", "exact", "randomized")


@dataclass
class ExtractOptions:
    max_rank: int = 128
    energy: Optional[float] = None  # keep the fewest singular values holding this share of sum S^2
    sv_epsilon: float = 0.0  # drop singular values at or below this (mergekit's --sv-epsilon)
    include: tuple[str, ...] = ()  # regular expressions searched in module names
    exclude: tuple[str, ...] = ()
    embed_lora: bool = False  # embeddings and LM head as LoRA, not saved whole
    save_modules: tuple[str, ...] = ()  # module names (or their last part) saved whole
    skip_undecomposable: bool = False  # drop changed non-matrix tensors instead of saving them whole
    skip_bias: bool = False  # leave out bias deltas instead of carrying them as lora_B.bias
    svd: str = "auto"  # exact, randomized, or auto: randomized where max_rank is small next to the matrix
    out_dtype: Optional[torch.dtype] = None  # default: the fine-tune's dtype
    overwrite: bool = False
    progress: bool = True


@dataclass
class ExtractPlan:
    base: Checkpoint
    finetune: Checkpoint
    lora: list[str]  # weight names decomposed
    biases: list[str]  # bias names carried as lora_B.bias
    saved: list[str]  # tensor names saved whole
    dropped: list[str]  # changed-or-maybe-changed tensors left out by include/exclude or skip
    base_name: str
    out_dtype: torch.dtype


@dataclass
class ExtractResult:
    out_dir: Path
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def module_of(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def is_embedding(name: str) -> bool:
    """A token embedding (PEFT adds (B A)^T to it), as opposed to the LM head, a linear layer."""
    return is_vocab_tensor(name) and is_pre_layer(name)


def option_problems(options: ExtractOptions) -> list[str]:
    problems = []
    if isinstance(options.max_rank, bool) or not isinstance(options.max_rank, int) or options.max_rank < 1:
        problems.append(f"--max-rank {options.max_rank!r}: must be a whole number of at least 1")
    if options.energy is not None and not 0 < options.energy <= 1:
        problems.append(f"--energy {options.energy!r}: must be in (0, 1], the share of sum S_i^2 kept")
    if options.svd not in SVD_CHOICES:
        problems.append(f"--svd {options.svd!r}: choose one of {', '.join(SVD_CHOICES)}")
    if options.sv_epsilon < 0:
        problems.append(f"--sv-epsilon {options.sv_epsilon!r}: must be at least 0")
    for flag, patterns in (("--include-regex", options.include), ("--exclude-regex", options.exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"{flag} {pattern!r}: not a regular expression ({err})")
    return problems


def _open(path: Path, flag: str, problems: list[str]) -> Optional[Checkpoint]:
    try:
        return Checkpoint.open(path)
    except InputError as err:
        problems.extend(f"{flag} {path}: {p}" for p in err.problems)
    except OSError as err:
        problems.append(f"{flag} {path}: {err.strerror or err}")
    return None


def plan_extraction(finetune_dir: Path, base_dir: Path, out_dir: Optional[Path],
                    options: ExtractOptions) -> ExtractPlan:
    """Decide every tensor's fate from the two checkpoints' headers; raises InputError with every problem."""
    problems = option_problems(options)
    finetune = _open(Path(finetune_dir), "--model", problems)
    base = _open(Path(base_dir), "--base-model", problems)
    if out_dir is not None:
        problems += output_problems(out_dir, {"--model": finetune_dir, "--base-model": base_dir})
        problems += existing_output_problems(out_dir, options.overwrite)
    if finetune is None or base is None or problems:  # the tensors are judged with valid options
        raise InputError(problems)
    tied = _tied_head(Path(finetune_dir), finetune)
    lora, biases, saved, dropped = [], [], [], []
    grown = []
    for name, info in finetune.infos.items():
        base_info = base.infos.get(name)
        if base_info is None:
            problems.append(f"--model {finetune_dir}: {name} is not in the base model {base_dir}; an adapter "
                            "can only change the base's own weights (is --base-model its base?)")
            continue
        if tuple(base_info.shape) != tuple(info.shape):
            if is_vocab_tensor(name) and info.shape[1:] == base_info.shape[1:]:
                grown.append(f"{name} ({base_info.shape[0]} -> {info.shape[0]} rows)")
            else:
                problems.append(f"--model {finetune_dir}: {name} is {list(info.shape)} but "
                                f"{list(base_info.shape)} in the base; is --base-model its base?")
            continue
        fate = _fate(name, info.shape, options, tied)
        if fate == LORA and name.endswith(".bias"):
            biases.append(name)
        elif fate == LORA:
            lora.append(name)
        elif fate == SAVE:
            saved.append(name)
        else:
            dropped.append(name)
    tied_saved = [n for n in saved if tied and is_embedding(n)]
    if tied_saved:
        problems.append(f"--model {finetune_dir}: its LM head is tied to {tied_saved[0]}, which --save-module "
                        "saves whole; PEFT would load that copy into the embedding alone and leave the head at "
                        "the base's weights. Leave it to be extracted as LoRA (drop that --save-module)")
    if grown:
        problems.append(f"--model {finetune_dir}: the vocabulary grew ({', '.join(grown)}); an adapter over "
                        f"{base_dir} cannot add tokens. Resize the base's embeddings to the fine-tune's "
                        "vocabulary first (resize_token_embeddings, saved as a new base) and extract from that")
    if problems:
        raise InputError(problems)
    # A bias rides on its module's LoRA pair; a bias whose weight is not decomposed is saved whole
    # with it, or dropped with it.
    decomposed = {module_of(n) for n in lora}
    for name in list(biases):
        if module_of(name) not in decomposed:
            biases.remove(name)
            (saved if module_of(name) + ".weight" in saved else dropped).append(name)
    biases = [n for n in biases if not torch.equal(finetune.read(n), base.read(n))]  # tiny: read now
    bare = [n for n in lora if module_of(n) + ".bias" not in base.infos]
    if biases and options.skip_bias:
        dropped += biases
        biases = []
    elif biases and bare:
        problems.append(f"--model {finetune_dir}: {len(biases)} biases changed (e.g. {biases[0]}), but PEFT's "
                        f"lora_bias would add a bias to every LoRA module, and {len(bare)} have none in the "
                        f"base (e.g. {module_of(bare[0])}), so PEFT could not fold the adapter. Save the "
                        "biased modules whole (--save-module, e.g. --save-module "
                        f"{module_of(biases[0]).rsplit('.', 1)[-1]}), extract only them (--include-regex), "
                        "or leave the bias deltas out (--skip-bias)")
        raise InputError(problems)
    base_name = str(Path(base_dir))
    out_dtype = options.out_dtype or next(iter(finetune.infos.values())).dtype
    return ExtractPlan(base, finetune, sorted(lora), sorted(biases), sorted(saved), sorted(dropped), base_name,
                       out_dtype)


def _tied_head(folder: Path, checkpoint: Checkpoint) -> bool:
    """Whether the model's LM head is its token embedding (config.json's tie_word_embeddings and
    no lm_head tensor of its own)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    tied = isinstance(config, dict) and config.get("tie_word_embeddings", False) is True
    return tied and not any(is_vocab_tensor(n) and not is_pre_layer(n) for n in checkpoint.infos)


def _fate(name: str, shape: tuple[int, ...], options: ExtractOptions, tied: bool = False) -> str:
    """lora, save (whole, in modules_to_save) or skip, as mergekit-extract-lora decides; but the
    embedding of a model with a tied LM head is never saved whole by default: PEFT would load the
    saved copy into the embedding alone and leave the head at the base's weights."""
    module = module_of(name)
    last = module.rsplit(".", 1)[-1]
    if module in options.save_modules or last in options.save_modules:
        return SAVE
    vocab = is_vocab_tensor(name)
    embed_lora = options.embed_lora or tied
    if vocab and not embed_lora and not any(re.search(p, module) for p in options.exclude):
        return SAVE
    if options.include and not any(re.search(p, module) for p in options.include):
        return SKIP
    if any(re.search(p, module) for p in options.exclude):
        return SKIP
    if len(shape) == 2 or name.endswith(".bias"):
        return LORA
    return SKIP if options.skip_undecomposable else SAVE


def differs(plan: ExtractPlan, name: str, block_bytes: int = 16 << 20) -> bool:
    """Whether the fine-tune's tensor differs from the base's, compared a block of rows at a time
    so that a large embedding is never resident whole."""
    info = plan.finetune.infos[name]
    rows = info.shape[0] if info.shape else 1
    if len(info.shape) < 2:
        return not torch.equal(plan.finetune.read(name), plan.base.read(name))
    step = max(1, block_bytes // max(1, info.nbytes // rows))
    try:
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            if not torch.equal(plan.finetune.read_rows(name, lo, hi), plan.base.read_rows(name, lo, hi)):
                return True
            plan.finetune.release(name)
            plan.base.release(name)
        return False
    finally:
        plan.finetune.release(name)
        plan.base.release(name)


def uses_randomized_svd(shape: tuple[int, int], options: ExtractOptions) -> bool:
    """``auto``: randomized when rank + oversampling is at most a quarter of the smaller side,
    where it costs a small fraction of a full SVD and its leading triplets are accurate."""
    if options.svd != "auto":
        return options.svd == "randomized"
    return 4 * (options.max_rank + OVERSAMPLE) <= min(shape)


def extract_module(base_weight: torch.Tensor, finetune_weight: torch.Tensor, embedding: bool,
                   options: ExtractOptions) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(A, B, report) for one weight: the truncated SVD of dW, in the adapter's orientation."""
    # One float32 matrix: the bf16 (or any) base is promoted element by element, never copied whole.
    delta = finetune_weight.to(torch.float32, copy=True).sub_(base_weight)
    if embedding:  # PEFT stores an embedding's delta as (B A)^T
        delta = delta.T
    total = float(delta.norm()) ** 2
    randomized = uses_randomized_svd(tuple(delta.shape), options)
    if randomized:
        u, s, vh = randomized_svd(delta, options.max_rank, oversample=OVERSAMPLE)
    else:
        u, s, vh = thin_svd(delta)
    rank = choose_rank(s, rank=options.max_rank, energy=options.energy, threshold=options.sv_epsilon, total=total)
    a, b = split_singular_values(u, s, vh, rank)
    error = residual_error(delta, a, b) if randomized else truncation_error(s, rank)
    return a, b, {"rank": rank, "relative_error": error,
                  "singular_values": [float(x) for x in s[:rank]], "svd": "randomized" if randomized else "exact"}


def extract_lora(finetune_dir: str | Path, base_dir: str | Path, out_dir: str | Path,
                 options: Optional[ExtractOptions] = None) -> ExtractResult:
    """Plan (every check first), decompose tensor by tensor, write the adapter folder atomically."""
    options = options or ExtractOptions()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_extraction(Path(finetune_dir), Path(base_dir), out_dir, options)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    report: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    with OutputLock(out_dir), _closing(plan):
        for name in _progress(plan.lora, options.progress):
            base_weight, finetune_weight = plan.base.read(name), plan.finetune.read(name)
            if torch.equal(base_weight, finetune_weight):
                unchanged.append(name)
            else:
                a, b, module_report = extract_module(base_weight, finetune_weight, is_embedding(name), options)
                factors[module_of(name)] = (a, b, is_embedding(name))
                report[module_of(name)] = module_report
            plan.base.release(name)
            plan.finetune.release(name)
        biases = {}
        for name in plan.biases:
            if module_of(name) in factors:
                biases[module_of(name)] = plan.finetune.read(name).float() - plan.base.read(name).float()
        # Views of the mapped file, not copies: written straight from the page cache, whose pages
        # are let go once each is written.
        saved = {name: plan.finetune.read(name) for name in plan.saved if differs(plan, name)}
        output = AdapterOutput(factors, plan.base_name, "CAUSAL_LM", saved=saved, lora_biases=biases,
                               release_saved=plan.finetune.release, report={
            "model": str(finetune_dir), "base_model": str(base_dir), "modules": report,
            "saved_whole": sorted(saved), "dropped": plan.dropped, "unchanged": sorted(unchanged)})
        if not factors and not saved:
            raise InputError(f"--model {finetune_dir}: no weight differs from the base's (within the included "
                             "modules); there is nothing to extract")
        write_adapter(out_dir, output, plan.out_dtype, overwrite=options.overwrite)
    return ExtractResult(out_dir, report, sorted(saved), plan.dropped, time.perf_counter() - start)


@contextmanager
def _closing(plan: ExtractPlan):
    try:
        yield
    finally:
        plan.base.close()
        plan.finetune.close()


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="extracting LoRA", unit="tensor")
