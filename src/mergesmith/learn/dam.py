"""DAM: learn per-column merge coefficients by distilling each expert on its own data.

Differentiable Adaptive Merging (Gauthier-Caron et al. 2024, "Merging in a Bottle",
https://arxiv.org/abs/2410.08371), following the arcee-ai/DAM code (``dam/merge.py``,
``dam/modeling/dam.py``, ``dam/custom_trainer/dam_trainer.py``, ``dam/train_dam.py``):

- Every linear layer's weight (q/k/v/o, gate/up/down and an untied ``lm_head``; DAM
  takes every ``nn.Linear``) of every model m gets a vector c_m with one entry per
  input column, initialised to 1/N, and the merged weight is, on the full weights
  (not task vectors),

      W = sum_m c_m ⊙ W_m        (W[:, j] = sum_m c_m[j] W_m[:, j] for an [out, in] weight)

  with no non-linearity on c (DAM's default). Embeddings and norms keep DAM's frozen
  1/N coefficients: their plain average. The coefficient vectors are the only
  trainable parameters.
- The loss of one step sums, over the experts e, the KL divergence from expert e to
  the merged model on a batch of e's own data, at temperature T = 2, scaled by T²
  and averaged over the batch's non-padded tokens:

      L_e = T² · Σ_tokens KL(softmax(z_e / T) ‖ softmax(z / T)) / #tokens

  plus DAM's similarity regularizer, summed over the linear layers:

      R = λ · Σ_layers mean_{m<m'} cos(c_m, c_m')      (λ = 0.01)

  which pushes each layer's models towards different columns.
- Optimizer as DAM's ``train_dam.py`` sets it: MoFO-AdamW (Chen et al. 2024) with
  lr 1e-3 constant, betas (0.9, 0.999), eps 1e-8, decoupled weight decay 0.01 (MoFO's
  own default, which DAM keeps) and alpha 0.3: each coefficient vector moves only in
  the 30% of its entries with the largest momentum. Gradients are clipped to norm 1
  (``max_grad_norm``), one epoch, one example per expert per step.

Where we deviate, and why:

- float32 throughout, not bf16: the learned model must be reproduced exactly by the
  streamed merge, and the CPU runs float32 anyway.
- The data are the experts' task files as the evaluation harness renders their
  prompts (``calibrate.data``: the same selection, tokenization and padding as
  calibration), not DAM's templated instruction/response pairs; the KL covers
  every position of those prompts. With ``include_answers`` each prompt is followed
  by its gold answer, tokenized as the harness scores it, and the KL covers the
  answer positions too: the nearest thing to DAM's instruction/response pairs.
- The KL is averaged over a batch's non-padded tokens. DAM's ``kl_div(batchmean)``
  then ``/ non_padded_tokens`` also divides by the batch size; at DAM's default
  batch size of 1 the two are the same.
- Biases (Llama-family models have none) are averaged like norms; DAM learns one
  scalar per bias, initialised to 1.
- A base model is optional and, when the recipe names one, is merged as one more
  input with its own coefficients and no KL term (DAM's ``--use_base_model``).
  Without it, as in DAM by default, only the experts are merged.
- Teacher logits are computed on the fly (DAM's ``generate_logits_on_fly``
  default); DAM's optional top-K precomputed logits are not offered.

Memory (docs/dam.md): every model's full weights in float32, plus one merged copy
and its gradient, plus one batch's activations and logits, all at once.
"""

from __future__ import annotations

import gc
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from mergesmith.calibrate.data import CalibrationSettings, Sequence, encode_items, padded_batches, select_items
from mergesmith.checkpoint.config import runnable_problems
from mergesmith.errors import InputError
from mergesmith.methods.dam import column_weighted_sum

COEFFICIENTS_FILE = "dam_coefficients.safetensors"
RECIPE_FILE = "dam.yml"


@dataclass(frozen=True)
class DamSettings:
    """The learning settings; defaults are arcee-ai/DAM's (``train_dam.py``, ``MoFOAdamW``)."""

    lr: float = 1e-3
    epochs: int = 1
    temperature: float = 2.0
    similarity: float = 0.01  # lambda_coef_similarity
    mofo_alpha: float = 0.3  # fraction of each coefficient vector updated per step; 1 = plain AdamW
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int = 1  # sequences of each expert per step
    samples: int = 256  # items drawn from each expert's files
    max_length: int = 512
    seed: int = 0
    # true: each expert's sequences are its items' prompts followed by their gold answers (calibrate/data.py),
    # so the KL also covers the answer tokens; false: prompts only
    include_answers: bool = False

    def problems(self) -> list[str]:
        out = []
        for name, ok, rule in (("lr", self.lr > 0, "> 0"), ("epochs", self.epochs >= 1, ">= 1"),
                               ("temperature", self.temperature > 0, "> 0"),
                               ("similarity", self.similarity >= 0, ">= 0"),
                               ("mofo_alpha", 0 < self.mofo_alpha <= 1, "in (0, 1]"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
                               ("batch_size", self.batch_size >= 1, ">= 1"), ("samples", self.samples >= 1, ">= 1"),
                               ("max_length", self.max_length >= 1, ">= 1")):
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                out.append(f"--{name.replace('_', '-')} {value} must be {rule}")
        return out


# ----------------------------------------------------------------------------- the loss


def kl_to_expert(merged_logits: torch.Tensor, expert_logits: torch.Tensor, mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T² · Σ_tokens KL(softmax(expert/T) ‖ softmax(merged/T)) / #tokens, over the tokens ``mask`` keeps."""
    log_q = F.log_softmax(merged_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(expert_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = mask.to(per_token.dtype)
    return temperature ** 2 * (per_token * mask).sum() / mask.sum().clamp_min(1)


def similarity_penalty(coefficients: list[torch.Tensor]) -> torch.Tensor:
    """mean over pairs m < m' of cos(c_m, c_m') for one layer (0 for a single model), as DAM's
    ``compute_mergers_similarity`` before its λ."""
    pairs = list(itertools.combinations(coefficients, 2))
    if not pairs:
        return coefficients[0].new_zeros(())
    return torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in pairs]).mean()


def regularizer(coefficients: dict[str, list[torch.Tensor]], weight: float) -> torch.Tensor:
    terms = [similarity_penalty(cs) for cs in coefficients.values()]
    return weight * torch.stack(terms).sum() if terms else torch.zeros(())


# ----------------------------------------------------------------------------- the optimizer


@torch.no_grad()
def mofo_adamw_step(params: list[torch.Tensor], state: dict[int, dict[str, Any]], step: int, *, lr: float,
                    alpha: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> None:
    """One MoFO-AdamW step (Chen et al. 2024, "MoFO", https://arxiv.org/abs/2407.20999), as DAM uses it.

    AdamW with decoupled weight decay, except that each tensor moves only in the
    ``alpha`` fraction of its entries whose first moment |m| is largest (ties at the
    threshold included); ``alpha = 1`` is plain AdamW.
    """
    b1, b2 = betas
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        s = state.setdefault(i, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        p.mul_(1 - lr * weight_decay)
        s["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
        s["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (s["v"].sqrt() / math.sqrt(1 - b2 ** step)).add_(eps)
        update = s["m"] / denom
        if alpha < 1:
            magnitude = s["m"].abs().flatten()
            k = max(1, int(magnitude.numel() * alpha))
            threshold = torch.topk(magnitude, k).values[-1]
            update = torch.where(s["m"].abs() >= threshold, update, torch.zeros_like(update))
        p.add_(update, alpha=-lr / (1 - b1 ** step))


# ----------------------------------------------------------------------------- the merged model


def linear_weight_names(model: torch.nn.Module) -> list[str]:
    """The weights of every ``nn.Linear`` that is a parameter of its own (a tied head is not)."""
    own = dict(model.named_parameters())
    return [f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" in own]


def merged_parameters(weights: list[dict[str, torch.Tensor]], coefficients: dict[str, list[torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Every parameter of the merged model: sum_m c_m ⊙ W_m for the linear weights, the average elsewhere."""
    n = len(weights)
    return {name: column_weighted_sum([w[name] for w in weights], coefficients.get(name, [None] * n))
            for name in weights[0]}


@dataclass
class ExpertData:
    model: int  # input position
    files: tuple[str, ...]
    sequences: list[Sequence] = field(default_factory=list)


def _batches(lm: Any, sequences: list[Sequence], batch_size: int, rng: Optional[random.Random]
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = list(sequences)
    if rng is not None:
        rng.shuffle(order)
    return [next(padded_batches(lm, order[i:i + batch_size], batch_size))
            for i in range(0, len(order), batch_size)]


@dataclass
class DamResult:
    coefficients: dict[str, list[torch.Tensor]]  # linear weight name -> one [in] vector per input
    names: list[str]  # the linear weights, in model order
    objective_before: float
    objective_after: float
    kl_before: float
    kl_after: float
    losses: list[float]  # the training loss of every step
    merged: Optional[dict[str, torch.Tensor]] = None  # the learned model's parameters, when asked for

    def flat(self) -> dict[str, torch.Tensor]:
        """The coefficient file's entries: ``"<tensor>:<input position>"`` -> [in] (what ``dam`` reads)."""
        return {f"{name}:{k}": c.detach().cpu().contiguous() for name, cs in self.coefficients.items()
                for k, c in enumerate(cs)}


def learn_dam(model_paths: list[Path], experts: list[ExpertData], settings: DamSettings = DamSettings(), *,
              device: str = "cpu", progress: bool = True, keep_merged: bool = False,
              on_step: Optional[Callable[[int, float], None]] = None) -> DamResult:
    """Learn DAM coefficients for the models at ``model_paths`` (all inputs, in recipe order).

    ``experts`` gives, for each model that has data, its task files; the others (a base
    model) are merged without a KL term. Holds every model's weights at once.
    """
    from mergesmith.evaluate.model import load_model

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    lm = load_model(model_paths[0], device=device, dtype="float32", max_length=settings.max_length)
    skeleton = lm.model
    for p in skeleton.parameters():
        p.requires_grad_(False)
    weights = [{n: p.detach() for n, p in skeleton.named_parameters()}]
    for path in model_paths[1:]:
        other = load_model(path, device=device, dtype="float32").model
        params = {n: p.detach() for n, p in other.named_parameters()}
        wrong = [f"{n}: {list(params[n].shape) if n in params else 'missing'} vs {list(w.shape)}"
                 for n, w in weights[0].items() if n not in params or params[n].shape != w.shape]
        if wrong or set(params) != set(weights[0]):
            raise InputError(f"{path}: its weights do not line up with {model_paths[0]} ({'; '.join(wrong[:3])}); "
                             "DAM merges models of one architecture")
        weights.append(params)
        del other
        gc.collect()
    n = len(weights)
    names = linear_weight_names(skeleton)
    coefficients = {name: [torch.full((weights[0][name].shape[-1],), 1.0 / n, device=lm.device, requires_grad=True)
                           for _ in range(n)] for name in names}
    trainable = [c for cs in coefficients.values() for c in cs]

    for e in experts:
        e.sequences = encode_items(lm, select_items(_calibration(e, settings)), settings.max_length,
                                   settings.include_answers)
        if not e.sequences:
            raise InputError(f"{', '.join(e.files)}: these task files give no tokens; give prompts")

    def forward(params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask, positions = (t.to(lm.device) for t in batch)
        return functional_call(skeleton, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask,
                                                                  "position_ids": positions,
                                                                  "use_cache": False}).logits

    def objective() -> tuple[float, float]:
        """(KL summed over the experts, each averaged over all its tokens; KL + regularizer), no grad."""
        with torch.no_grad():
            merged = merged_parameters(weights, coefficients)
            total = 0.0
            for e in experts:
                kl_sum, tokens = 0.0, 0
                for batch in _batches(lm, e.sequences, settings.batch_size, None):
                    count = int(batch[1].sum())
                    kl = kl_to_expert(forward(merged, batch), forward(weights[e.model], batch), batch[1].to(lm.device),
                                      settings.temperature)
                    kl_sum += float(kl) * count
                    tokens += count
                total += kl_sum / tokens
            return total, total + float(regularizer(coefficients, settings.similarity))

    kl_before, objective_before = objective()
    steps = max(-(-len(e.sequences) // settings.batch_size) for e in experts)
    losses: list[float] = []
    optimizer_state: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=steps * settings.epochs, desc="dam", unit="step", disable=not progress)
    try:
        for _ in range(settings.epochs):
            # One shuffled pass over each expert's data per epoch; a shorter one starts over.
            plans = [_batches(lm, e.sequences, settings.batch_size, rng) for e in experts]
            for step in range(steps):
                merged = merged_parameters(weights, coefficients)
                loss = regularizer(coefficients, settings.similarity).to(lm.device)
                for e, batches in zip(experts, plans):
                    batch = batches[step % len(batches)]
                    with torch.no_grad():
                        target = forward(weights[e.model], batch)
                    loss = loss + kl_to_expert(forward(merged, batch), target, batch[1].to(lm.device),
                                               settings.temperature)
                for c in trainable:
                    c.grad = None
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                mofo_adamw_step(trainable, optimizer_state, len(losses) + 1, lr=settings.lr,
                                alpha=settings.mofo_alpha, weight_decay=settings.weight_decay)
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(len(losses), losses[-1])
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                bar.update(1)
                del merged, loss
    finally:
        bar.close()
    kl_after, objective_after = objective()
    for c in trainable:
        c.requires_grad_(False)
    merged_out = None
    if keep_merged:
        with torch.no_grad():
            merged_out = {k: v.detach().cpu() for k, v in merged_parameters(weights, coefficients).items()}
    return DamResult({k: [c.detach().cpu() for c in cs] for k, cs in coefficients.items()}, names,
                     objective_before, objective_after, kl_before, kl_after, losses, merged_out)


def _calibration(e: ExpertData, settings: DamSettings) -> CalibrationSettings:
    return CalibrationSettings(e.files, settings.samples, settings.max_length, settings.seed, settings.batch_size,
                               include_answers=settings.include_answers)


# ----------------------------------------------------------------------------- the flow: recipe + data -> DIR


@dataclass
class DamPlan:
    """What a run will do, all checked before any weight is read."""

    where: str  # the recipe, for messages
    refs: list[str]  # every input, in the order the written recipe lists them
    paths: list[Path]
    experts: list[ExpertData]
    out_dir: Path
    recipe_extras: dict[str, Any]  # out_dtype, tokenizer settings, ... carried into the written recipe


def _expert_index(name: str, refs: list[str], paths: list[Path]) -> Optional[int]:
    """The input a ``--data`` name means: its reference as written, its path, or its folder name if unique."""
    for i, ref in enumerate(refs):
        if name == ref:
            return i
    local = Path(name).expanduser()
    if local.exists():
        for i, path in enumerate(paths):
            if path.resolve() == local.resolve():
                return i
    by_folder = [i for i, path in enumerate(paths) if path.name == name]
    return by_folder[0] if len(by_folder) == 1 else None


def plan_dam(recipe: Any, data: dict[str, list[str]], out_dir: Any, settings: DamSettings = DamSettings(), *,
             overwrite: bool = False) -> DamPlan:
    """Check the recipe (its models: list names the inputs), the ``--data`` experts and their task
    files, the settings and the output folder; one InputError lists every problem."""
    from pydantic import ValidationError

    from mergesmith.engine.models import resolve_model_path
    from mergesmith.paths import output_problems
    from mergesmith.recipe import RecipeSpec, read_recipe_raw

    raw, where = read_recipe_raw(recipe)
    problems = settings.problems()
    try:
        spec = RecipeSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError([f"{where}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]) from None
    if spec.slices or not spec.models:
        raise InputError(f"{where}: mergesmith dam needs a models: list (the experts, and a base model if any); "
                         "slices: are not supported")
    refs = [m.model for m in spec.models]
    if spec.base_model and spec.base_model not in refs:
        refs.append(spec.base_model)  # as the engine does: the base is the last input
    if len(refs) < 2:
        problems.append(f"{where}: models: DAM merges at least two models; list them under models:")
    paths: list[Path] = []
    for ref in refs:
        try:
            path = resolve_model_path(ref)
            if not (path / "config.json").is_file():
                problems.append(f"{ref}: not a model folder (no config.json)")
            problems += runnable_problems(path)  # every model is run, to distill from and to merge
            paths.append(path)
        except InputError as err:
            problems += err.problems
            paths.append(Path(ref))
    experts: dict[int, ExpertData] = {}
    for name, files in data.items():
        k = _expert_index(name, refs, paths)
        if k is None:
            problems.append(f"--data {name}=...: {name} is not a model of {where}; name one of: {', '.join(refs)}")
            continue
        if k in experts:
            problems.append(f"--data {name}=...: {refs[k]} is given data twice; give all its files in one --data")
            continue
        if not files:
            problems.append(f"--data {name}=: give at least one task file")
        missing = [f for f in files if not Path(f).is_file()]
        problems += [f"--data {name}={f}: no such task file" for f in missing]
        experts[k] = ExpertData(k, tuple(files))
        if files and not missing:
            try:
                select_items(_calibration(experts[k], settings))
            except InputError as err:
                problems += [f"--data {name}: {p}" for p in err.problems]
    for k, ref in enumerate(refs):
        if k not in experts and ref != spec.base_model:
            problems.append(f"{where}: models: {ref} has no data; give --data {ref}=FILES (DAM distills every "
                            "expert on its own data; only the base model may go without)")
    out_dir = Path(out_dir)
    inputs: dict[str, Path] = {ref: path for ref, path in zip(refs, paths)}
    if where != "recipe":
        inputs[f"the recipe {where}"] = Path(where)
    inputs.update({f"task file {f}": Path(f) for e in experts.values() for f in e.files})
    problems += output_problems(out_dir, inputs)
    existing = [f for f in (RECIPE_FILE, COEFFICIENTS_FILE) if (out_dir / f).exists()]
    if existing and not overwrite:
        problems.append(f"{out_dir}: already holds {', '.join(existing)}; choose another folder or pass --overwrite")
    if problems:
        raise InputError(problems)
    extras = {k: v for k, v in raw.items() if k in ("out_dtype", "tokenizer_source", "tokenizer", "chat_template",
                                                       "name") and v is not None}
    if "out_dtype" not in extras and raw.get("dtype"):
        extras["out_dtype"] = raw["dtype"]
    return DamPlan(where, refs, paths, [experts[k] for k in sorted(experts)], out_dir, extras)


def write_dam(plan: DamPlan, result: DamResult, settings: DamSettings) -> tuple[Path, Path]:
    """Write the coefficient file and the recipe that merges with it (each file appears complete)."""
    import json
    import os

    import yaml
    from safetensors.torch import save_file

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    coef_path = (plan.out_dir / COEFFICIENTS_FILE).resolve()
    tmp = coef_path.with_name(f".{coef_path.name}.tmp-{os.getpid()}")
    save_file(result.flat(), str(tmp), metadata={"format": "mergesmith-dam", "models": json.dumps(plan.refs)})
    os.replace(tmp, coef_path)
    # Local models are written as absolute paths, so that the recipe works from any folder.
    models = [{"model": str(path.resolve()) if Path(ref).expanduser().exists() else ref}
              for ref, path in zip(plan.refs, plan.paths)]
    recipe = {"merge_method": "dam", "models": models, "parameters": {"coefficients": str(coef_path)},
              "dtype": "float32", **plan.recipe_extras}
    header = (f"# Written by mergesmith dam from {plan.where}: DAM coefficients learned on "
              + "; ".join(f"{plan.refs[e.model]} <- {', '.join(e.files)}" for e in plan.experts) + ".\n"
              f"# objective (KL summed over experts + similarity regularizer): {result.objective_before:.6g} "
              f"before, {result.objective_after:.6g} after; settings: "
              + ", ".join(f"{k}={v}" for k, v in vars(settings).items()) + "\n")
    recipe_path = plan.out_dir / RECIPE_FILE
    tmp = recipe_path.with_name(f".{recipe_path.name}.tmp-{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    os.replace(tmp, recipe_path)
    return recipe_path, coef_path


def run_dam(recipe: Any, data: dict[str, list[str]], out_dir: Any, settings: DamSettings = DamSettings(), *,
            device: str = "cpu", progress: bool = True, overwrite: bool = False,
            keep_merged: bool = False) -> tuple[DamResult, Path, Path]:
    """Plan (every check first), learn, write ``DIR/dam.yml`` and ``DIR/dam_coefficients.safetensors``."""
    from mergesmith.paths import OutputLock

    plan = plan_dam(recipe, data, out_dir, settings, overwrite=overwrite)
    plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(plan.out_dir):
        result = learn_dam(plan.paths, plan.experts, settings, device=device, progress=progress,
                           keep_merged=keep_merged)
        recipe_path, coef_path = write_dam(plan, result, settings)
    return result, recipe_path, coef_path
