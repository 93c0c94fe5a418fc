"""Train only the routers of a mixture of experts, and write a new model folder.

Routers are found by their exact parameter names, ``model.layers.L.block_sparse_moe.gate.weight``
(Mixtral), ``model.layers.L.mlp.gate.weight`` and ``model.layers.L.mlp.shared_expert_gate.weight``
(Qwen2/3-MoE): a substring match on ``gate`` would also train every expert's ``gate_proj``.
Everything else stays frozen and is copied into the new folder byte for byte.

The loss is the language-model loss over each training text (a labelled task item's prompt, the
task's target delimiter and its gold answer) plus ``balance`` times transformers' load-balancing
loss (Switch Transformer: E · Σ_e f_e · P_e over the layers, f_e the share of tokens routed to e,
P_e the mean router probability of e; 1 when perfectly balanced). AdamW on the routers alone.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from mergesmith.checks import at_least, device_problems, resolve_device
from mergesmith.checkpoint.config import read_config
from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor, remove_stale_partials
from mergesmith.errors import InputError
from mergesmith.paths import OutputLock, output_problems

ROUTER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe\.gate|mlp\.gate|mlp\.(?P<shared>shared_expert_gate))"
                         r"\.weight$")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
TRAINING_LOG = "mergesmith_router_training.json"


@dataclass
class RouterTraining:
    steps: int = 100
    lr: float = 1e-3
    balance: float = 0.01  # weight of the load-balancing loss
    batch_size: int = 8
    max_length: int = 256  # tokens per text; longer texts are cut
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    out_shard_size: int = 5 * 10 ** 9
    progress: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    routers: list[str]
    losses: list[float] = field(default_factory=list)  # total loss per step
    balance_losses: list[float] = field(default_factory=list)


def router_names(names) -> list[str]:
    """The router weights among parameter names, by exact pattern (never ``gate_proj``)."""
    return [n for n in names if ROUTER_NAME.match(n)]


def router_key(name: str) -> tuple[int, bool]:
    """(layer, shared) of a router name: transformers 5 loads Mixtral's ``block_sparse_moe.gate`` as
    ``mlp.gate``, so the names in memory and on disk differ and are matched by this."""
    m = ROUTER_NAME.match(name)
    return int(m["layer"]), m["shared"] is not None


def training_texts(tasks) -> list[str]:
    """A labelled item's prompt, its task's target delimiter and its gold answer."""
    return [item.prompt + task.settings.target_delimiter + item.gold_text
            for task in tasks for item in task.items if item.gold_text is not None]


def _problems(moe_dir: Path, out_dir: Path, data: list, options: RouterTraining) -> list[str]:
    problems = device_problems(options.device)
    problems += at_least("--steps", options.steps, 1) + at_least("--batch-size", options.batch_size, 1)
    problems += at_least("--max-length", options.max_length, 2)
    if not options.lr > 0:
        problems.append(f"--lr {options.lr}: must be positive, e.g. 1e-3")
    if not options.balance >= 0:
        problems.append(f"--balance {options.balance}: must be zero or positive")
    if not data:
        problems.append("--data: give at least one task file with labelled items")
    if not (moe_dir / "config.json").is_file():
        problems.append(f"{moe_dir}: not a model folder (no config.json); give the folder mergesmith moe wrote")
    else:
        try:
            model_type = read_config(moe_dir / "config.json").get("model_type")
            if model_type not in MOE_TYPES:
                problems.append(f"{moe_dir}: model_type {model_type!r} is not a mixture of experts "
                                f"({', '.join(MOE_TYPES)}); build one with mergesmith moe first")
        except InputError as err:
            problems += err.problems
    problems += output_problems(out_dir, {str(moe_dir): moe_dir, **{str(p): Path(p) for p in data}})
    if out_dir.exists() and not options.overwrite:
        problems.append(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
    return problems


def train_routers(moe_dir: Union[str, Path], data: list[Union[str, Path]], out_dir: Union[str, Path], *,
                  options: Optional[RouterTraining] = None, **kwargs) -> TrainResult:
    """Train the routers of ``moe_dir`` on the labelled items of the task files ``data``; write ``out_dir``."""
    from mergesmith.evaluate import load_tasks

    options = dataclasses.replace(options or RouterTraining(), **kwargs)
    moe_dir, out_dir, data = Path(moe_dir), Path(out_dir), list(data)
    problems = _problems(moe_dir, out_dir, data, options)
    texts: list[str] = []
    try:
        texts = training_texts(load_tasks(data)) if data else []
    except InputError as err:
        problems += err.problems
    if data and not texts and not problems:
        problems.append(f"--data {' '.join(map(str, data))}: no labelled items (answers or references) to train on")
    if problems:
        raise InputError(problems)
    with OutputLock(out_dir):
        remove_stale_partials(out_dir)
        trained, result = _train(moe_dir, texts, options)
        result.out_dir = _write(moe_dir, out_dir, trained, options, result)
    return result


def _batches(texts: list[str], size: int, seed: int):
    rng = random.Random(seed)
    order: list[str] = []
    while True:
        if len(order) < size:
            shuffled = list(texts)
            rng.shuffle(shuffled)
            order += shuffled
        yield order[:size]
        order = order[size:]


def _train(moe_dir: Path, texts: list[str], options: RouterTraining) -> tuple[dict[str, torch.Tensor], TrainResult]:
    from tqdm.auto import tqdm

    from mergesmith.evaluate.model import load_model
    from mergesmith.evaluate.scoring import left_padded

    torch.manual_seed(options.seed)
    lm = load_model(str(moe_dir), device=resolve_device(options.device), dtype=torch.float32)
    model = lm.model
    params = dict(model.named_parameters())
    names = router_names(params)
    for name, p in params.items():
        p.requires_grad_(name in names)
    model.router_aux_loss_coef = options.balance  # transformers adds coef * aux_loss to the loss
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=options.lr, weight_decay=0.0)
    result = TrainResult(Path(), names)
    model.train()
    batches = _batches(texts, options.batch_size, options.seed)
    for _ in tqdm(range(options.steps), desc="router training", unit="step", disable=not options.progress):
        encoded = [(lm.prefix_ids + ids)[: options.max_length] for ids in lm.encode(next(batches))]
        ids, mask, positions = left_padded(lm, encoded)
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                    position_ids=positions.to(lm.device), labels=labels.to(lm.device), output_router_logits=True,
                    use_cache=False)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        result.losses.append(out.loss.item())
        result.balance_losses.append(out.aux_loss.item() if out.aux_loss is not None else 0.0)
    model.eval()
    return {router_key(n): params[n].detach().cpu() for n in names}, result


def _write(moe_dir: Path, out_dir: Path, trained: dict[tuple[int, bool], torch.Tensor], options: RouterTraining,
           result: TrainResult) -> Path:
    """A copy of ``moe_dir`` with the trained routers, streamed tensor by tensor, finished atomically."""
    checkpoint = Checkpoint.open(moe_dir)
    infos = checkpoint.infos
    specs = [OutputTensor(n, i.dtype, i.shape) for n, i in infos.items()]
    try:
        with CheckpointWriter(out_dir, specs, options.out_shard_size, overwrite=options.overwrite) as writer:
            routers = {n: router_key(n) for n in router_names(infos)}
            if sorted(routers.values()) != sorted(trained):
                raise RuntimeError(f"{moe_dir}: routers on disk {sorted(routers)} do not match those trained")
            for name, info in infos.items():
                tensor = trained[routers[name]].to(info.dtype) if name in routers else checkpoint.read(name)
                writer.write(name, tensor)
                checkpoint.release(name)
            weights = {info.file for info in infos.values()}
            for path in sorted(moe_dir.iterdir()):
                if path.is_file() and path not in weights and not path.name.endswith(".index.json"):
                    writer.copy_file(path)
            log = {"options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
                   "routers": result.routers, "losses": result.losses, "balance_losses": result.balance_losses}
            writer.write_file(TRAINING_LOG, json.dumps(log, indent=2) + "\n")
            return writer.commit()
    finally:
        checkpoint.close()
