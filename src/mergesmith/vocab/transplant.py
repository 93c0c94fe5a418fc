"""``tokensurgeon``'s checkpoint side: check both folders, build the new vocabulary rows, write.

``plan_surgery`` reads configs, tokenizers and tensor headers only, and reports every problem at
once (``InputError``) before any weight is read. ``tokensurgeon`` then builds the output's
embedding (and LM head, and any auxiliary vocabulary tensor) with ``surgeon.build_matrix``, and
streams the model's other tensors through the atomic ``CheckpointWriter`` one at a time, each a
view of the model's mapped file, released once written: only the vocabulary matrices (the
model's, the donor's and the new ones) are ever whole in memory.

The output folder holds the model's weights with the donor's vocabulary, the model's config.json
with the donor's ``vocab_size`` and special-token ids, the model's generation_config.json with the
donor's token ids, the donor's tokenizer files, and ``mergesmith_tokensurgeon.json`` (what each
matrix's rows came from).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mergesmith.checkpoint.config import read_config
from mergesmith.checkpoint.layout import is_vocab_tensor, split_layer_name
from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor
from mergesmith.checks import device_problems, resolve_device
from mergesmith.engine.side_files import TOKENIZER_FILES
from mergesmith.errors import InputError
from mergesmith.paths import OutputLock, output_problems
from mergesmith.vocab.surgeon import (APPROXIMATIONS, MATCH_SCOPES, ROLES, Assignment, TokenKey, build_matrix,
                                      match_tokens, normalised_vocabulary, remap_rows, shared_tokens,
                                      surface_kind)

INPUT_EMBEDDING_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
# config.json fields naming token ids (mergekit's list); the output takes the donor's.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id",
                   "decoder_start_token_id")
REPORT = "mergesmith_tokensurgeon.json"


@dataclass
class SurgeonOptions:
    approximation: str = "omp"  # omp, mean or zero
    k: int = 64  # shared tokens per approximated token (mergekit's default)
    byte_match: str = "yes"  # yes, no, embed (the input embedding only) or lm_head
    prefix_match: str = "no"
    batch_size: int = 512  # targets per pursuit (mergekit's default)
    device: str = "cpu"
    out_shard_size: int = 5 * 10 ** 9
    overwrite: bool = False
    progress: bool = True
    dry_run: bool = False  # plan, report what each row would come from and the predicted peak; write nothing


@dataclass
class Folder:
    """One model folder, opened: config, tokenizer vocabulary, tensor headers, vocabulary tensors."""
    path: Path
    flag: str
    config: dict
    vocab: dict[TokenKey, int]
    tokenizer_span: int  # the largest token id + 1
    checkpoint: Optional[Checkpoint] = None
    embedding: Optional[str] = None
    head: Optional[str] = None  # None: the LM head is the embedding (tied) or absent

    def rows(self) -> int:
        assert self.checkpoint is not None and self.embedding is not None
        return self.checkpoint.infos[self.embedding].shape[0]


@dataclass
class SurgeryPlan:
    model: Folder
    donor: Folder
    out_dir: Path
    out_rows: int
    options: SurgeonOptions
    matrices: dict[str, tuple[Optional[str], Assignment]]  # model tensor -> (donor tensor, its rows' sources)
    auxiliary: list[str]  # other tensors with one row per token (an LM head bias)
    shared: tuple[list[int], list[int]]
    tensors: list[OutputTensor] = field(default_factory=list)


@dataclass
class SurgeryResult:
    out_dir: Path
    report: dict[str, Any]
    seconds: float


# --- reading the two folders --------------------------------------------------------------------

def read_vocabulary(folder: Path, flag: str, problems: list[str]) -> Optional[tuple[dict[TokenKey, int], int]]:
    """The tokenizer's normalised vocabulary and id span, loaded as transformers loads it (never with
    the folder's own code); None with a problem added when it cannot be loaded."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{flag} {folder}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
                        "tokensurgeon needs both models' tokenizers: copy the tokenizer the model was trained "
                        "with into its folder")
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many kinds; the user needs the message either way
        problems.append(f"{flag} {folder}: its tokenizer does not load ({type(err).__name__}: {err}); fix or "
                        "replace its tokenizer files")
        return None
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_json = json.loads(backend.to_str()) if backend is not None else None
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    roles = {role: getattr(tokenizer, role, None) for role in ROLES}
    roles = {role: text for role, text in roles.items() if isinstance(text, str)}
    keys = normalised_vocabulary(vocab, surface_kind(tokenizer_json), added, roles)
    return keys, max(vocab.values(), default=-1) + 1


def find_vocabulary_tensors(checkpoint: Checkpoint) -> tuple[Optional[str], Optional[str]]:
    """(input embedding, LM head) names: the embedding is a matrix named like one (``embed_tokens``,
    ``wte``, ...), the head ``lm_head.weight`` or its kin; None where absent."""
    # Per-layer tensors are never vocabulary tensors, whatever their names say (``...output.weight``).
    matrices = [name for name, info in checkpoint.infos.items()
                if len(info.shape) == 2 and split_layer_name(name) is None]
    embedding = next((n for n in matrices if n.endswith(".weight") and any(h in n for h in INPUT_EMBEDDING_HINTS)),
                     None)
    head = next((n for n in matrices if any(n == h or n.endswith("." + h) for h in HEAD_NAMES)), None)
    return embedding, head


def open_folder(path: Path, flag: str, problems: list[str], weights: bool) -> Optional[Folder]:
    """Config, tokenizer and (with ``weights``) tensor headers of one folder; every problem added."""
    if not path.is_dir():
        problems.append(f"{flag} {path}: no such folder; give a Hugging Face model folder")
        return None
    config = None
    try:
        config = read_config(path / "config.json")
    except InputError as err:
        problems.extend(err.problems)
    vocabulary = read_vocabulary(path, flag, problems)
    checkpoint = embedding = head = None
    if weights:
        try:
            checkpoint = Checkpoint.open(path)
        except InputError as err:
            problems.extend(f"{flag} {p}" for p in err.problems)
        if checkpoint is not None:
            embedding, head = find_vocabulary_tensors(checkpoint)
            if embedding is None:
                problems.append(f"{flag} {path}: no token embedding matrix found (a 2-D tensor named like "
                                "model.embed_tokens.weight); tokensurgeon handles decoder language models")
            elif head is not None and checkpoint.infos[head].shape[0] != checkpoint.infos[embedding].shape[0]:
                problems.append(f"{flag} {path}: {head} has {checkpoint.infos[head].shape[0]} rows but {embedding} "
                                f"has {checkpoint.infos[embedding].shape[0]}; both must have one row per token id")
    if config is None or vocabulary is None or (weights and embedding is None):
        return None
    return Folder(path, flag, config, vocabulary[0], vocabulary[1], checkpoint, embedding, head)


def option_problems(options: SurgeonOptions) -> list[str]:
    problems = []
    if options.approximation not in APPROXIMATIONS:
        problems.append(f"--approximation {options.approximation!r}: use one of {', '.join(APPROXIMATIONS)}")
    for flag, value in (("--byte-match", options.byte_match), ("--prefix-match", options.prefix_match)):
        if value not in MATCH_SCOPES:
            problems.append(f"{flag} {value!r}: use one of {', '.join(MATCH_SCOPES)}")
    for flag, value in (("--k", options.k), ("--batch-size", options.batch_size),
                        ("--out-shard-size", options.out_shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{flag} {value!r}: must be a whole number of at least 1")
    return problems + device_problems(options.device, kinds=("cpu", "cuda"))


# --- the plan -----------------------------------------------------------------------------------

def plan_surgery(model_dir: str | Path, donor_dir: str | Path, out_dir: str | Path,
                 options: Optional[SurgeonOptions] = None) -> SurgeryPlan:
    """Everything checked and decided from headers, configs and tokenizers; InputError with every
    problem otherwise."""
    options = options or SurgeonOptions()
    model_dir, donor_dir, out_dir = Path(model_dir), Path(donor_dir), Path(out_dir)
    problems = option_problems(options)
    problems += output_problems(out_dir, {"MODEL": model_dir, "DONOR": donor_dir})
    if out_dir.exists() and not options.overwrite and not options.dry_run:
        problems.append(f"{out_dir} exists; pass --overwrite to replace it")
    omp = options.approximation == "omp"
    model = open_folder(model_dir, "MODEL", problems, weights=True)
    donor = open_folder(donor_dir, "DONOR", problems, weights=omp)  # mean and zero need no donor weights
    if model is None or donor is None:
        raise InputError(problems)

    model_rows = model.rows()
    donor_rows = donor.rows() if omp else None
    donor_config_rows = donor.config.get("vocab_size") if isinstance(donor.config.get("vocab_size"), int) else 0
    out_rows = max(donor.tokenizer_span, donor_config_rows, donor_rows or 0)
    shared = shared_tokens(model.vocab, donor.vocab, model_rows, donor_rows or out_rows)
    if omp and len(shared[0]) < options.k:
        problems.append(f"MODEL {model_dir} and DONOR {donor_dir} share only {len(shared[0])} tokens, fewer than "
                        f"--k {options.k}; lower --k to at most {len(shared[0])}, or use --approximation mean")

    matrices: dict[str, tuple[Optional[str], Assignment]] = {}
    scopes = {"embed": ("yes", "embed"), "lm_head": ("yes", "lm_head")}
    for role, name in (("embed", model.embedding), ("lm_head", model.head)):
        if name is None:
            continue
        donor_name = (donor.embedding if role == "embed" else donor.head or donor.embedding) if omp else None
        matrices[name] = (donor_name, match_tokens(model.vocab, donor.vocab, model_rows, donor_rows,
                                                   byte_match=options.byte_match in scopes[role],
                                                   prefix_match=options.prefix_match in scopes[role]))
    auxiliary = [name for name, info in model.checkpoint.infos.items()
                 if name not in matrices and is_vocab_tensor(name) and split_layer_name(name) is None
                 and info.shape and info.shape[0] == model_rows]
    if problems:
        raise InputError(problems)
    plan = SurgeryPlan(model, donor, out_dir, out_rows, options, matrices, auxiliary, shared)
    for name, info in model.checkpoint.infos.items():
        resized = name in matrices or name in auxiliary
        plan.tensors.append(OutputTensor(name, info.dtype, (out_rows, *info.shape[1:]) if resized else info.shape))
    return plan


def output_config(plan: SurgeryPlan) -> dict:
    """The model's config.json with the donor's vocabulary size and special-token ids."""
    config = json.loads(json.dumps(plan.model.config))
    holder = config.get("text_config") if "vocab_size" not in config and isinstance(config.get("text_config"),
                                                                                      dict) else config
    holder["vocab_size"] = plan.out_rows
    for key in TOKEN_ID_FIELDS:
        if plan.donor.config.get(key) is not None:
            holder[key] = plan.donor.config[key]
        else:  # the model's id would point at some unrelated donor token
            holder.pop(key, None)
    return config


def output_generation_config(plan: SurgeryPlan) -> Optional[dict]:
    """The model's generation_config.json (its sampling settings) with the donor's token ids, taken
    from the donor's generation_config.json, else its config.json; None when the model has none."""
    path = plan.model.path / "generation_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    donor_path = plan.donor.path / "generation_config.json"
    ids = json.loads(donor_path.read_text()) if donor_path.is_file() else plan.donor.config
    for key in TOKEN_ID_FIELDS:
        if ids.get(key) is not None:
            config[key] = ids[key]
        else:
            config.pop(key, None)
    return config


# --- the run ------------------------------------------------------------------------------------

def predicted_peak_bytes(plan: SurgeryPlan) -> int:
    """What the run holds at its peak, from the headers: every rebuilt vocabulary tensor whole in the
    model's dtype (they are kept until the write), plus, for the matrix being built, the model's and
    the donor's matrices as read and, with ``omp``, the shared rows and a batch of targets in float32.
    The model's other tensors are streamed one at a time (the largest of them counted)."""
    infos = plan.model.checkpoint.infos
    built = sum(plan.out_rows * _row_bytes(infos[name]) for name in (*plan.matrices, *plan.auxiliary))
    working = 0
    for name, (donor_name, _) in plan.matrices.items():
        cols = infos[name].shape[1] if len(infos[name].shape) > 1 else 1
        donor = plan.donor.checkpoint.infos[donor_name].nbytes if donor_name and plan.donor.checkpoint else 0
        omp = 4 * cols * (2 * len(plan.shared[0]) + plan.options.batch_size) if donor_name else 0
        working = max(working, infos[name].nbytes + donor + omp)
    streamed = max((i.nbytes for n, i in infos.items() if n not in plan.matrices and n not in plan.auxiliary),
                   default=0)
    return built + max(working, streamed)


def _row_bytes(info: Any) -> int:
    return math.prod(info.shape[1:]) * info.dtype.itemsize


def tokensurgeon(model_dir: str | Path, donor_dir: str | Path, out_dir: str | Path,
                 options: Optional[SurgeonOptions] = None) -> SurgeryResult:
    """Give the model at ``model_dir`` the tokenizer of ``donor_dir``; the new model goes to ``out_dir``.
    With ``options.dry_run`` everything is checked and planned from headers and tokenizers, no weight
    is read and nothing is written: the result's report says what each row would come from."""
    options = options or SurgeonOptions()
    start = time.perf_counter()
    plan = plan_surgery(model_dir, donor_dir, out_dir, options)
    if options.dry_run:
        plan.model.checkpoint.close()
        if plan.donor.checkpoint is not None:
            plan.donor.checkpoint.close()
        return SurgeryResult(plan.out_dir, {**report(plan), "dry_run": True,
                                            "predicted_peak_bytes": predicted_peak_bytes(plan)},
                             time.perf_counter() - start)
    device = torch.device(resolve_device(options.device))
    try:
        with OutputLock(plan.out_dir):
            built = build_vocabulary_tensors(plan, device)
            write_output(plan, built)
    finally:
        plan.model.checkpoint.close()
        if plan.donor.checkpoint is not None:
            plan.donor.checkpoint.close()
    return SurgeryResult(plan.out_dir, report(plan), time.perf_counter() - start)


def build_vocabulary_tensors(plan: SurgeryPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """The new embedding, LM head and auxiliary tensors, whole (one row per donor token id)."""
    from tqdm.auto import tqdm

    total = sum(len(a.approximate) for _, a in plan.matrices.values())
    bar = tqdm(total=total, desc=f"approximating ({plan.options.approximation})", unit="token",
               disable=not plan.options.progress or total == 0)
    built = {}
    donor_read: dict[str, torch.Tensor] = {}
    with bar:
        for name, (donor_name, assignment) in plan.matrices.items():
            donor_matrix = None
            if donor_name is not None:
                donor_matrix = donor_read.setdefault(donor_name, plan.donor.checkpoint.read(donor_name))
            built[name] = build_matrix(plan.model.checkpoint.read(name), donor_matrix, assignment, plan.shared,
                                       plan.out_rows, plan.options.approximation, plan.options.k,
                                       plan.options.batch_size, device, progress=bar.update)
            plan.model.checkpoint.release(name)
    embedding_assignment = plan.matrices[plan.model.embedding][1]
    for name in plan.auxiliary:
        built[name] = remap_rows(plan.model.checkpoint.read(name), embedding_assignment, plan.out_rows)
    return built


def write_output(plan: SurgeryPlan, built: dict[str, torch.Tensor]) -> None:
    """Every tensor into the atomic writer (the model's own ones streamed), then the side files."""
    from tqdm.auto import tqdm

    checkpoint = plan.model.checkpoint
    with CheckpointWriter(plan.out_dir, plan.tensors, plan.options.out_shard_size,
                          overwrite=plan.options.overwrite) as writer:
        for spec in tqdm(plan.tensors, desc="writing", unit="tensor", disable=not plan.options.progress):
            if spec.name in built:
                writer.write(spec.name, built[spec.name])
            else:
                writer.write(spec.name, checkpoint.read(spec.name))
                checkpoint.release(spec.name)
        writer.write_file("config.json", json.dumps(output_config(plan), indent=2, sort_keys=True) + "\n")
        generation = output_generation_config(plan)
        if generation is not None:
            writer.write_file("generation_config.json", json.dumps(generation, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (plan.donor.path / name).is_file():
                writer.copy_file(plan.donor.path / name)
        writer.write_file(REPORT, json.dumps(report(plan), indent=2) + "\n")
        writer.commit()


def report(plan: SurgeryPlan) -> dict[str, Any]:
    """What each matrix's rows came from, for the report file and the command's summary."""
    return {
        "model": str(plan.model.path), "donor": str(plan.donor.path), "vocab_size": plan.out_rows,
        "approximation": plan.options.approximation, "k": plan.options.k if plan.options.approximation == "omp"
        else None, "shared_tokens": len(plan.shared[0]),
        "tensors": {name: {**assignment.counts, "approximated": len(assignment.approximate),
                           "zero_no_donor_row": len(assignment.unbacked), "from_donor": donor_name}
                    for name, (donor_name, assignment) in plan.matrices.items()},
        "auxiliary": plan.auxiliary,
    }
