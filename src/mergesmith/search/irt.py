"""Estimate a candidate's full-validation accuracy from its answers on a few anchor items (IRT).

After MERGE³ (Mencattini et al., "MERGE³: Efficient Evolutionary Merging on Consumer-grade
GPUs", ICML 2025) and tinyBenchmarks (Polo et al., 2024). A multidimensional two-parameter
logistic model gives the chance that a model of ability ``θ`` (a vector of ``D`` numbers)
answers item ``i`` right:

    P(correct_i | θ) = σ(a_i · θ − b_i)

The item parameters ``a_i`` (discrimination, ``D`` numbers) and ``b_i`` (difficulty) are fitted
on our own models' answers to every validation item (the base, the experts and the first
candidates), by joint maximum likelihood with a small L2 penalty (the ``θ`` of those models are
fitted alongside and then dropped). tinyBenchmarks' published parameters cover only the
leaderboard tasks, hence the fit.

A later candidate answers only the anchor items (the fitness subsample). Its ability is the
penalized maximum-likelihood ``θ`` for those answers with the items fixed, and its accuracy on a
task is estimated as tinyBenchmarks' gp-IRT does with all weight on the items not seen:

    acc ≈ ( Σ_{anchors} correct_i + Σ_{other items} P(correct_i | θ) ) / n_task
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

ItemKey = tuple[str, int]  # (task name, item position in its file)


@dataclass
class ItemBank:
    keys: list[ItemKey]  # every validation item, in a fixed order
    a: torch.Tensor  # (N, D) discriminations
    b: torch.Tensor  # (N,) difficulties
    penalty: float = 0.1

    @property
    def index(self) -> dict[ItemKey, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def ability(self, answers: dict[ItemKey, float], steps: int = 200) -> torch.Tensor:
        """Penalized maximum-likelihood θ from the answers given (items fixed)."""
        index = self.index
        rows = [index[k] for k in answers if k in index]
        y = torch.tensor([answers[self.keys[i]] for i in rows], dtype=torch.float64)
        a, b = self.a[rows], self.b[rows]
        theta = torch.zeros(self.a.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ theta - b, y, reduction="sum") \
                + self.penalty * theta.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        return theta.detach()

    def estimate(self, answers: dict[ItemKey, float]) -> dict[str, float]:
        """Per-task accuracy estimates: the anchors as answered, the other items at P(correct | θ)."""
        theta = self.ability(answers)
        p = torch.sigmoid(self.a @ theta - self.b)
        totals: dict[str, list[float]] = {}
        for i, key in enumerate(self.keys):
            value = answers[key] if key in answers else float(p[i])
            totals.setdefault(key[0], []).append(value)
        return {task: float(np.mean(v)) for task, v in totals.items()}


def fit_items(keys: list[ItemKey], responses: list[dict[ItemKey, float]], dim: int = 2, steps: int = 300,
              penalty: float = 0.1, seed: int = 0) -> ItemBank:
    """Fit ``a``, ``b`` (and throwaway abilities) on models' answers to the items ``keys``.

    ``responses``: one mapping per model from item to 1.0 (right) or 0.0 (wrong); an item a
    model did not answer is left out of the likelihood.
    """
    index = {k: i for i, k in enumerate(keys)}
    m, n = len(responses), len(keys)
    y = torch.zeros(m, n, dtype=torch.float64)
    seen = torch.zeros(m, n, dtype=torch.bool)
    for r, answers in enumerate(responses):
        for key, value in answers.items():
            if key in index:
                y[r, index[key]] = value
                seen[r, index[key]] = True
    gen = torch.Generator().manual_seed(seed)
    theta = (0.1 * torch.randn(m, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    a = (0.1 * torch.randn(n, dim, generator=gen, dtype=torch.float64)).abs().requires_grad_()
    # Start each difficulty at the logit of the item's observed error rate (smoothed).
    rate = (y * seen).sum(0).add(0.5) / seen.sum(0).add(1.0)
    b = torch.logit(1 - rate).clone().requires_grad_()
    opt = torch.optim.Adam([theta, a, b], lr=0.05)
    weight = seen.to(torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        logits = theta @ a.T - b
        nll = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum()
        loss = nll + penalty * (theta.square().sum() + a.square().sum() + 0.01 * b.square().sum())
        loss.backward()
        opt.step()
    return ItemBank(list(keys), a.detach(), b.detach(), penalty)


def mean_absolute_error(pairs: list[tuple[float, float]]) -> Optional[float]:
    return float(np.mean([abs(x - y) for x, y in pairs])) if pairs else None


@dataclass
class IRTFitness:
    """The search's use of the estimator: which candidates are evaluated in full, when the items are
    fitted, and how far the estimates fall from full evaluations of held-back candidates.

    Calibration: the base and the experts (``add_reference``) and the first ``calibration``
    candidates are evaluated on every validation item; then the items are fitted once. After that,
    every ``holdout_every``-th candidate is still evaluated in full, never fitted on, and its
    estimate (from its anchor answers alone) is compared with its full score: that is the reported
    mean absolute error.
    """

    keys: list[ItemKey]
    anchors: set[ItemKey]
    weights: dict[str, float]
    calibration: int = 8
    holdout_every: int = 5
    dim: int = 2
    seed: int = 0
    bank: Optional[ItemBank] = None
    fitted_on: int = 0

    def __post_init__(self) -> None:
        self.responses: list[dict[ItemKey, float]] = []
        self.calibrated = 0
        self.pairs: list[tuple[float, float]] = []  # (estimated, full) fitness of held-back candidates
        self.raw_pairs: list[tuple[float, float]] = []  # (anchor accuracy alone, full), for comparison
        self.eval_s: dict[str, list[float]] = {"full": [], "anchors": []}

    def wants_full(self, index: int) -> bool:
        return self.bank is None or index % self.holdout_every == 0

    def add_reference(self, result: dict) -> None:
        self.responses.append(_answers(result))

    def score(self, result: dict) -> dict:
        """The record fields for one scored candidate: fitness and the scores behind it."""
        from mergesmith.search.fitness import weighted_fitness

        answers = _answers(result)
        anchor = {k: v for k, v in answers.items() if k in self.anchors}
        subsample = _per_task(anchor)
        self.eval_s["full" if result["full"] else "anchors"].append(result["eval_s"])
        fields: dict = {"subsample": weighted_fitness(subsample, self.weights), "estimated": None, "full": None}
        if result["full"]:
            scores = result["scores"]
            fields["full"] = weighted_fitness(scores, self.weights)
            if self.bank is None:
                self.responses.append(answers)
                self.calibrated += 1
                if self.calibrated >= self.calibration:
                    self.bank = fit_items(self.keys, self.responses, self.dim, seed=self.seed)
                    self.fitted_on = len(self.responses)
            else:
                fields["estimated"] = weighted_fitness(self.bank.estimate(anchor), self.weights)
                self.pairs.append((fields["estimated"], fields["full"]))
                self.raw_pairs.append((fields["subsample"], fields["full"]))
        elif self.bank is not None:
            scores = self.bank.estimate(anchor)
            fields["estimated"] = weighted_fitness(scores, self.weights)
        else:
            scores = subsample
        fields["scores"] = scores
        fields["fitness"] = fields["full"] if fields["full"] is not None else weighted_fitness(scores, self.weights)
        return fields

    def state(self) -> dict:
        """Everything a resumed search needs, as JSON-able data: item keys as ``[task, position]``,
        answers grouped by task as the workers report them, the fitted ``a`` and ``b`` as nested
        lists (a float64 survives JSON exactly, so the reloaded bank estimates bit for bit the same)."""
        bank = None if self.bank is None else {"a": self.bank.a.tolist(), "b": self.bank.b.tolist(),
                                               "penalty": self.bank.penalty}
        return {"keys": [list(k) for k in self.keys], "anchors": sorted(list(k) for k in self.anchors),
                "weights": self.weights, "calibration": self.calibration, "holdout_every": self.holdout_every,
                "dim": self.dim, "seed": self.seed, "bank": bank, "fitted_on": self.fitted_on,
                "responses": [_grouped(answers) for answers in self.responses], "calibrated": self.calibrated,
                "pairs": self.pairs, "raw_pairs": self.raw_pairs, "eval_s": self.eval_s}

    @classmethod
    def from_state(cls, state: dict) -> "IRTFitness":
        keys = [(task, int(pos)) for task, pos in state["keys"]]
        bank = state["bank"]
        irt = cls(keys, {(task, int(pos)) for task, pos in state["anchors"]}, dict(state["weights"]),
                  state["calibration"], state["holdout_every"], state["dim"], state["seed"],
                  None if bank is None else ItemBank(keys, torch.tensor(bank["a"], dtype=torch.float64),
                                                     torch.tensor(bank["b"], dtype=torch.float64), bank["penalty"]),
                  state["fitted_on"])
        irt.responses = [_answers({"answers": grouped}) for grouped in state["responses"]]
        irt.calibrated = state["calibrated"]
        irt.pairs = [(x, y) for x, y in state["pairs"]]
        irt.raw_pairs = [(x, y) for x, y in state["raw_pairs"]]
        irt.eval_s = {k: list(v) for k, v in state["eval_s"].items()}
        return irt

    def report(self) -> dict:
        full, anchors = self.eval_s["full"], self.eval_s["anchors"]
        return {"fitted": self.bank is not None, "fitted_on_models": self.fitted_on,
                "anchor_items": len(self.anchors), "items": len(self.keys),
                "held_back": len(self.pairs), "mae": mean_absolute_error(self.pairs),
                "mae_of_subsample_alone": mean_absolute_error(self.raw_pairs),
                "speedup": (float(np.mean(full)) / float(np.mean(anchors))) if full and anchors else None}


def _answers(result: dict) -> dict[ItemKey, float]:
    return {(task, int(pos)): float(v) for task, rows in (result.get("answers") or {}).items() for pos, v in rows}


def _grouped(answers: dict[ItemKey, float]) -> dict[str, list[list]]:
    """The inverse of ``_answers``: ``{task: [[position, value], ...]}``, in the answers' order."""
    grouped: dict[str, list[list]] = {}
    for (task, pos), v in answers.items():
        grouped.setdefault(task, []).append([pos, v])
    return grouped


def _per_task(answers: dict[ItemKey, float]) -> dict[str, float]:
    return {task: float(np.mean([v for _, v in rows])) for task, rows in _grouped(answers).items()}
