"""Mixture-of-experts rows of the benchmark (``moe:<kind>``, docs/moe.md): the zoo's eight experts
kept whole as the experts of one Mixtral, top-2.

Every row is a ``mergesmith moe`` config over the base and the full experts of the trained skills
(expert e's MLPs become expert e of every layer; attention, norms and embeddings are the base's):

- ``moe:hidden``: mergekit's default gate mode, rows from the base's hidden states over each
  expert's prompts;
- ``moe:ridge``: mergesmith's training-free least-squares router at the router's real input;
- ``moe:trained``: the ``ridge`` mixture with its routers trained (``mergesmith moe-train``) on the
  train items of every trained skill;
- ``moe:trained+shared-ties``: as ``moe:trained``, but the tensors outside the MLPs are merged from
  the experts by TIES (``shared_tensors``) at the point the ``ties`` row chose on validation.

Data: each expert's gate prompts are the first ``prompts`` items (prompt and answer, as the experts
were fine-tuned) of its skill's **train** file; router training reads the same train files. Test
data is read only to score the rows and to measure routing accuracy (the share of each trained
skill's test tokens whose top-1 router choice is that skill's expert, mean over layers).

Cost, from the written checkpoint: parameters relative to the base, and active parameters per
token (every tensor outside the routed experts plus ``top_k`` experts' MLPs) relative to the base:
the matrix multiplications a token costs, attention's score products aside.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mergesmith.errors import InputError

MOE_KINDS = ("hidden", "ridge", "trained", "trained+shared-ties")
TOP_K = 2


@dataclass(frozen=True)
class MoESettings:
    """Gate prompts per expert and router training, per zoo size (set for run time, never on test)."""

    prompts: int = 64  # train items per expert for the gates (mergekit's prompt lists are a handful)
    train_steps: int = 100  # mergesmith moe-train's default
    train_lr: float = 1e-3
    train_batch_size: int = 8
    train_balance: float = 0.01


MOE_SETTINGS = {"test": MoESettings(prompts=8, train_steps=4)}


def settings_for(size: str) -> MoESettings:
    return MOE_SETTINGS.get(size, MoESettings())


def parse_moe(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in MOE_KINDS]
    if unknown:
        raise InputError(f"--moe: {', '.join(unknown)} not a mixture-of-experts row; choose from "
                         f"{', '.join(MOE_KINDS)}")
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise InputError(f"--moe: {', '.join(repeated)} named more than once; name each row once")
    return kinds


def gate_prompts(zoo: Any, skill: str, n: int) -> list[str]:
    """The first ``n`` train items of ``skill`` as its expert saw them in fine-tuning."""
    from mergesmith.evaluate import load_tasks
    from mergesmith.moe.train import training_texts

    return training_texts(load_tasks([zoo.tasks["train"]["gen"][skill]], limit=n))


def moe_config(zoo: Any, kind: str, ties_point: dict | None = None) -> dict:
    """The ``mergesmith moe`` config of row ``moe:<kind>`` (before any router training)."""
    n = settings_for(zoo.size).prompts
    config: dict[str, Any] = {
        "base_model": str(zoo.base), "architecture": "Mixtral", "dtype": "float32",
        "gate_mode": "hidden" if kind == "hidden" else "ridge", "experts_per_token": TOP_K,
        "experts": [{"source_model": str(zoo.experts[s]), "positive_prompts": gate_prompts(zoo, s, n)}
                    for s in zoo.trained]}
    if kind == "trained+shared-ties":
        # as the bench's ties row: every expert at weight 1 (the TIES mean), its density and lambda
        config["shared_tensors"] = {"merge_method": "ties", "parameters": {**(ties_point or {}), "weight": 1.0}}
    return config


def train_files(zoo: Any) -> list[Path]:
    return [Path(zoo.tasks["train"]["gen"][s]) for s in zoo.trained]


def build_moe_row(zoo: Any, kind: str, config: dict, folder: Path, device: str, seed: int) -> Path:
    """Write the mixture of row ``moe:<kind>`` to ``folder`` (its routers trained for ``trained*``)."""
    from mergesmith.moe import MoEOptions, build_moe
    from mergesmith.moe.train import RouterTraining, train_routers

    folder.parent.mkdir(parents=True, exist_ok=True)
    built = folder if not kind.startswith("trained") else folder.parent / f"{folder.name}-untrained"
    # float32 prompt pass: the zoo's models are float32, and the measured rows (docs/moe.md) were built so
    build_moe(config, built, options=MoEOptions(device=device, overwrite=True, progress=False, random_seed=seed,
                                                prompt_dtype="float32"))
    if built != folder:
        s = settings_for(zoo.size)
        train_routers(built, train_files(zoo), folder,
                      options=RouterTraining(steps=s.train_steps, lr=s.train_lr, batch_size=s.train_batch_size,
                                             balance=s.train_balance, seed=seed, device=device, overwrite=True,
                                             progress=False))
        shutil.rmtree(built, ignore_errors=True)
    return folder


def parameter_cost(folder: Path, base: Path, top_k: int = TOP_K) -> dict[str, float]:
    """Parameters and active parameters per token of the mixture, each relative to the base's."""
    from mergesmith.checkpoint.reader import Checkpoint

    def count(path: Path) -> tuple[int, int, int]:
        ckpt = Checkpoint.open(path)
        try:
            infos = ckpt.infos.values()
            total = sum(i.numel for i in infos)
            routed = sum(i.numel for i in infos if ".experts." in i.name)
            experts = len({i.name.split(".experts.")[1].split(".")[0] for i in infos if ".experts." in i.name})
            return total, routed, experts
        finally:
            ckpt.close()

    total, routed, experts = count(folder)
    base_total = count(base)[0]
    active = total - routed + routed * min(top_k, experts) // max(experts, 1)
    return {"params_x": total / base_total, "active_params_x": active / base_total, "experts": experts,
            "top_k": top_k}


def moe_row_extras(zoo: Any, folder: Path, device: str) -> dict[str, Any]:
    """Routing accuracy on the trained skills' test items and the parameter cost of ``folder``."""
    from mergesmith.moe.routing import routing_accuracy

    report = routing_accuracy(folder, [[zoo.tasks["test"]["gen"][s]] for s in zoo.trained], device=device)
    per_skill = dict(zip(zoo.trained, report.per_expert.tolist()))
    return {"routing_accuracy": report.accuracy, "routing_by_skill": per_skill, **parameter_cost(folder, zoo.base)}


def run_moe_rows(kinds: tuple[str, ...], zoo: Any, seed: int, work: Path, device: str, cache: Any,
                 timed: Callable[[Path, str], dict], scored: Callable[[str], bool],
                 ties_point: Callable[[], dict], log: Callable[[str], None]) -> dict[str, dict]:
    """Build, score and measure every ``moe:<kind>`` row: its scores per form, routing accuracy,
    cost and evaluation seconds. Nothing is built when the scores and the measures are cached."""
    rows: dict[str, dict] = {}
    for kind in kinds:
        t0 = time.time()
        config = moe_config(zoo, kind, ties_point() if kind == "trained+shared-ties" else None)
        settings = settings_for(zoo.size) if kind.startswith("trained") else None
        key = f"{zoo.root}|moe|{kind}|{json.dumps(config, sort_keys=True)}|{settings}|seed={seed}"
        folder = work / "moe" / f"seed{seed}" / kind.replace("+", "-")
        measures_key = f"{key}|measures"
        if not (scored(key) and cache._path(measures_key).exists()):
            shutil.rmtree(folder, ignore_errors=True)
            build_moe_row(zoo, kind, config, folder, device, seed)
        measures = cache.get_or_run(measures_key, lambda: {**moe_row_extras(zoo, folder, device),
                                                           "build_seconds": time.time() - t0})
        evaluated = timed(folder, key)
        shutil.rmtree(folder, ignore_errors=True)
        rows[f"moe:{kind}"] = {"scores": {form: v["scores"] for form, v in evaluated.items()},
                               "eval_seconds": sum(v["seconds"] for v in evaluated.values()), **measures}
        log(f"seed {seed}: moe:{kind:20s} routing accuracy {measures['routing_accuracy']:.3f} "
            f"({time.time() - t0:.0f}s)")
    return rows
