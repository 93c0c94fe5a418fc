"""The task-arithmetic family: merges built from task vectors tau_t = theta_t - theta_0.

    merged = theta_0 + lambda * combine_t( w_t * prune(tau_t) )

    task_arithmetic   no pruning, sum                    Ilharco et al. 2023
    ties              magnitude trim, sign election, disjoint mean   Yadav et al. 2023
    dare_linear       random drop + 1/p rescale, sum     Yu et al. 2024
    dare_ties         random drop + 1/p rescale, sign election
    breadcrumbs       drop outliers and small entries, sum   Davari & Belilovsky 2024
    breadcrumbs_ties  the same, sign election
    della_linear      MAGPRUNE + 1/p_i rescale, sum      Deep et al. 2024
    della             MAGPRUNE + 1/p_i rescale, sign election
    consensus_ta      task arithmetic, then keep entries in >= k TALL masks  Wang et al. 2024
    consensus_ties    TIES, then the same consensus mask

Names, parameters, defaults and base handling follow mergekit 0.1.5 except where the
papers say otherwise (the 1/p rescale of DARE and DELLA); see docs/methods/task_arithmetic.md.
The pruning pieces live in ``mergesmith.methods.sparsify``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from mergesmith.methods.base import (
    BasePolicy,
    MethodSpec,
    Param,
    TensorGroup,
    density_param,
    every_tensor,
    register,
    weight_param,
)
from mergesmith.methods.sparsify import (
    drop_outliers_and_small,
    magprune,
    magprune_bounds_problem,
    random_drop,
    trim_by_magnitude,
)

# Prunes one task vector in place, given that model's parameters, the global ones, the
# generator and a scratch tensor of the delta's shape it may overwrite.
Pruner = Callable[[torch.Tensor, dict[str, Any], dict[str, Any], Optional[torch.Generator],
                   torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- pieces

def task_vectors(base: torch.Tensor, models: list[torch.Tensor], *,
                 inplace: bool = False) -> list[torch.Tensor]:
    """tau_t = theta_t - theta_0 for every model; ``inplace`` overwrites the models."""
    if inplace:
        return [model.sub_(base) for model in models]
    return [torch.sub(model, base) for model in models]


def stacked_task_vectors(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """tau_t = theta_t - theta_0 stacked along a new first axis, shape (T, *base.shape)."""
    return torch.stack(models).sub_(base)


def elect_sign(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES "elect": the sign with the larger total mass, gamma = sgn(sum_t tau_t).

    Returns a bool tensor, True where the elected sign is positive; a zero sum elects
    positive (as mergekit). Yadav et al. 2023, the "elect" step.
    """
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    return total.ge_(0).bool()


def disjoint_merge(deltas: list[torch.Tensor], weights: list[float], positive: torch.Tensor,
                   *, mean: bool) -> torch.Tensor:
    """TIES "disjoint merge": combine only the entries that agree with the elected sign.

        A_p = {t : sgn(tau_t,p) = gamma_p}
        sum:   tau_p = sum_{t in A_p} tau_t,p
        mean:  tau_p = sum_{t in A_p} tau_t,p / sum_{t in A_p} w_t   (1 when A_p is empty)

    ``deltas`` are the weighted, pruned task vectors and are consumed. With unit weights
    the mean is the disjoint mean of Yadav et al. 2023 (the "disjoint merge" step); with
    weights it is mergekit's weighted disjoint mean.
    """
    sign = positive.to(deltas[0].dtype).mul_(2).sub_(1)
    total = torch.zeros_like(sign)
    for delta in deltas:
        # Times the elected sign, agreeing entries are positive and relu keeps exactly
        # them (as |tau|): no bool masks, which are slow to apply on CPU.
        total.add_(delta.mul_(sign).relu_())
    total.mul_(sign)
    if not mean:
        return total
    divisor = sign.zero_()
    for delta, weight in zip(deltas, weights):
        divisor.add_(delta.sign_(), alpha=weight)
    divisor.masked_fill_(divisor == 0, 1)
    return total.div_(divisor)


def apply_task_vector(base: torch.Tensor, merged_delta: torch.Tensor, lam: float) -> torch.Tensor:
    """theta_0 + lambda * tau (reuses ``merged_delta``'s storage)."""
    if lam != 1:
        merged_delta.mul_(lam)
    return merged_delta.add_(base)


def tall_mask(task_vector: torch.Tensor, multi_task_vector: torch.Tensor,
              mask_lambda: float) -> torch.Tensor:
    """TALL mask of one task: m_t = 1{|tau_t| >= lambda_t * |tau_MTL - tau_t|}.

    The entries where the multi-task model is closer to the fine-tuned model theta_t than
    the base is (up to lambda_t). Wang et al., "Localizing Task Information for Improved
    Model Merging and Compression", ICML 2024, https://arxiv.org/abs/2405.07813.
    """
    distance = torch.sub(multi_task_vector, task_vector).abs_()
    if mask_lambda != 1:
        distance.mul_(mask_lambda)
    return task_vector.abs() >= distance


def consensus_mask(votes: torch.Tensor, k: int) -> torch.Tensor:
    """Consensus Merging: keep the entries on in at least k TALL masks (k = 2 drops the
    "selfish" weights, used by one task, and the "catastrophic" ones, used by none).
    Wang et al. 2024."""
    return votes >= k


# ---------------------------------------------------------------- pruners

def _no_pruning(delta, model_params, params, generator, workspace):
    return delta


def _trim(delta, model_params, params, generator, workspace):
    return trim_by_magnitude(delta, model_params["density"], rescale=params.get("rescale", False),
                             inplace=True, workspace=workspace)


def _breadcrumbs(delta, model_params, params, generator, workspace):
    return drop_outliers_and_small(delta, model_params["density"], model_params["gamma"],
                                   rescale=params["rescale"], inplace=True, workspace=workspace)


def _dare(delta, model_params, params, generator, workspace):
    return random_drop(delta, model_params["density"], generator, rescale=params["rescale"],
                       inplace=True, workspace=workspace)


def _della(delta, model_params, params, generator, workspace):
    return magprune(delta, model_params["density"], model_params["epsilon"], generator,
                    rescale=params["rescale"], inplace=True, workspace=workspace)


def pruned_task_vectors(group: TensorGroup, prune: Pruner, *,
                        inplace: bool = False) -> list[torch.Tensor]:
    """prune(tau_t) of every non-base model (``inplace``: in the models' own storage)."""
    models, model_params = group.others()
    deltas = task_vectors(group.base, models, inplace=inplace)
    if prune is not _no_pruning:
        workspace = torch.empty_like(group.base)
        for delta, mp in zip(deltas, model_params):
            prune(delta, mp, group.params, group.generator, workspace)
    return deltas


def weighted_sum_of_task_vectors(group: TensorGroup, prune: Pruner, *,
                                 inplace: bool = False) -> torch.Tensor:
    """sum_t w_t prune(tau_t), forming one task vector at a time.

    With ``inplace`` each model's storage is overwritten by its pruned (unweighted) task
    vector; otherwise one buffer is reused.
    """
    base = group.base
    total = torch.zeros_like(base)
    buffer = None if inplace else torch.empty_like(base)
    workspace = None if prune is _no_pruning else torch.empty_like(base)
    for model, mp in zip(*group.others()):
        delta = model.sub_(base) if inplace else torch.sub(model, base, out=buffer)
        prune(delta, mp, group.params, group.generator, workspace)
        total.add_(delta, alpha=mp["weight"])
    return total


def multi_task_vector(group: TensorGroup, prune: Pruner, *, elect: bool,
                      inplace: bool = False) -> torch.Tensor:
    """The merged task vector tau_MTL, with tau'_t = prune(tau_t):

        elect: false   sum_t w_t tau'_t               (/ sum_t w_t with normalize)
        elect: true    disjoint sum of w_t tau'_t     (/ agreeing weights with normalize)

    ``inplace`` lets it overwrite the non-base input tensors.
    """
    weights = [mp["weight"] for mp in group.others()[1]]
    normalize = group.params["normalize"]
    if elect:
        deltas = pruned_task_vectors(group, prune, inplace=inplace)
        for delta, weight in zip(deltas, weights):
            delta.mul_(weight)
        return disjoint_merge(deltas, weights, elect_sign(deltas), mean=normalize)
    total = weighted_sum_of_task_vectors(group, prune, inplace=inplace)
    weight_sum = sum(weights)
    if normalize and abs(weight_sum) >= 1e-8:
        # mergekit divides by 1 when the weights sum to ~0; so do we, for parity.
        total.div_(weight_sum)
    return total


def merge_task_vectors(group: TensorGroup, prune: Pruner, *, elect: bool) -> torch.Tensor:
    """theta_0 + lambda * tau_MTL, the whole family but consensus."""
    merged = multi_task_vector(group, prune, elect=elect, inplace=group.disposable)
    return apply_task_vector(group.base, merged, group.params["lambda"])


def merge_with_consensus(group: TensorGroup, prune: Pruner, *, elect: bool) -> torch.Tensor:
    """Consensus merging: theta_0 + lambda * (1{sum_t m_t >= k} * tau_MTL).

    Each TALL mask m_t compares tau_MTL with the unweighted, unpruned tau_t (the real
    fine-tuned model theta_t).
    """
    # Without pruning, in-place task vectors leave each model holding its raw tau_t,
    # which the masks need; pruning would destroy it.
    inplace = group.disposable and prune is _no_pruning and not elect
    multi = multi_task_vector(group, prune, elect=elect, inplace=inplace)
    base = group.base
    votes = torch.zeros(base.shape, dtype=torch.uint8, device=base.device)
    for model, mp in zip(*group.others()):
        tau = model if inplace else torch.sub(model, base)
        votes += tall_mask(tau, multi, mp["tall_mask_lambda"])
    multi.masked_fill_(~consensus_mask(votes, group.params["consensus_k"]), 0)
    return apply_task_vector(base, multi, group.params["lambda"])


# ---------------------------------------------------------------- methods

def task_arithmetic(group: TensorGroup) -> torch.Tensor:
    """Task arithmetic: theta_0 + lambda * sum_t w_t tau_t (divided by sum_t w_t under
    normalize). Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
    https://arxiv.org/abs/2212.04089. ``density`` is accepted and unused, as in mergekit."""
    return merge_task_vectors(group, _no_pruning, elect=False)


def ties(group: TensorGroup) -> torch.Tensor:
    """TIES: trim each tau_t to its top-k magnitudes, elect the sign by total mass and take
    the disjoint (weighted) mean: theta_0 + lambda * sum_{t in A_p} w_t tau'_t,p /
    sum_{t in A_p} w_t. Yadav et al. 2023, https://arxiv.org/abs/2306.01708."""
    return merge_task_vectors(group, _trim, elect=True)


def dare_linear(group: TensorGroup) -> torch.Tensor:
    """DARE + task arithmetic: theta_0 + lambda * sum_t w_t (m_t * tau_t / p_t),
    m_t ~ Bernoulli(p_t), p_t = density. Yu et al. 2024, https://arxiv.org/abs/2311.03099."""
    return merge_task_vectors(group, _dare, elect=False)


def dare_ties(group: TensorGroup) -> torch.Tensor:
    """DARE drop-and-rescale followed by TIES sign election and disjoint merge."""
    return merge_task_vectors(group, _dare, elect=True)


def breadcrumbs(group: TensorGroup) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest gamma and the smallest entries of each tau_t
    (density remains), then sum. Davari & Belilovsky 2024, https://arxiv.org/abs/2312.06795."""
    return merge_task_vectors(group, _breadcrumbs, elect=False)


def breadcrumbs_ties(group: TensorGroup) -> torch.Tensor:
    """Model Breadcrumbs pruning followed by TIES sign election and disjoint merge."""
    return merge_task_vectors(group, _breadcrumbs, elect=True)


def della_linear(group: TensorGroup) -> torch.Tensor:
    """DELLA without sign election: MAGPRUNE each tau_t, rescale by 1/p_i, sum.
    Deep et al. 2024, https://arxiv.org/abs/2406.11617."""
    return merge_task_vectors(group, _della, elect=False)


def della(group: TensorGroup) -> torch.Tensor:
    """DELLA: Drop (MAGPRUNE + 1/p_i rescale), Elect (sign by total mass), Fuse (disjoint
    mean, times lambda). Deep et al. 2024, https://arxiv.org/abs/2406.11617."""
    return merge_task_vectors(group, _della, elect=True)


def consensus_ta(group: TensorGroup) -> torch.Tensor:
    """Consensus task arithmetic: tau_MTL = sum_t w_t tau_t; keep its entries that lie in at
    least ``consensus_k`` TALL masks; theta_0 + lambda * mask * tau_MTL. Wang et al. 2024,
    https://arxiv.org/abs/2405.07813."""
    return merge_with_consensus(group, _no_pruning, elect=False)


def consensus_ties(group: TensorGroup) -> torch.Tensor:
    """Consensus TIES: as ``consensus_ta`` with tau_MTL the TIES-merged vector (trim to
    density, elect, disjoint sum; disjoint mean with normalize). Wang et al. 2024."""
    return merge_with_consensus(group, _trim, elect=True)


# ---------------------------------------------------------------- parameter checks

def _inputs(model_params: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    # The base's entry holds only on_base parameters, so it lacks the non-base ones.
    return [mp for mp in model_params if key in mp]


def _check_della(params: dict[str, Any], model_params: list[dict[str, Any]]) -> list[str]:
    # check_params does not learn the models' recipe fields; the values name the culprit.
    problems = [magprune_bounds_problem(mp["density"], mp["epsilon"])
                for mp in _inputs(model_params, "epsilon")]
    return sorted({p for p in problems if p})


def _check_consensus(params: dict[str, Any], model_params: list[dict[str, Any]]) -> list[str]:
    n = len(_inputs(model_params, "weight"))
    k = params["consensus_k"]
    if k > n:
        return [f"consensus_k = {k} but only {n} model(s) besides the base are merged: no entry "
                f"can be in {k} TALL masks, so the result would be the base model; set "
                f"consensus_k to at most {n} (2 drops weights used by fewer than two tasks, "
                f"0 keeps every entry)"]
    return []


# ---------------------------------------------------------------- registration

def _lambda() -> Param:
    return Param("lambda", float, 1.0, doc="scale of the merged task vector")


def _family_params(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    return (
        weight_param(),
        density_param(),
        _lambda(),
        Param("normalize", bool, normalize,
              doc="divide by the sum of the weights (of the agreeing models, with sign election)"),
        Param("rescale", bool, rescale,
              doc="random drops: divide kept entries by their keep probability; magnitude "
                  "trims: restore the L1 norm"),
        Param("int8_mask", bool, False, doc="accepted for mergekit recipes; no effect here"),
    )


_GAMMA = Param("gamma", float, 0.01, per_model=True, low=0.0, high=1.0,
               doc="fraction of largest-magnitude entries dropped as outliers")
_EPSILON = Param("epsilon", float, 0.15, per_model=True, low=0.0, high=0.5,
                 doc="half-width of the keep-probability window around density")

_TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"
_TALL = "https://arxiv.org/abs/2405.07813"


def _register(name: str, fn, extra: tuple[Param, ...] = (), *, normalize: bool,
              rescale: bool, stochastic: bool = False, reference: str, summary: str,
              check=None, row_separable=None) -> None:
    register(MethodSpec(
        name=name, fn=fn, params=_family_params(normalize, rescale) + extra,
        base=BasePolicy.REQUIRED, min_models=1, stochastic=stochastic,
        reference=reference, summary=summary, check_params=check, row_separable=row_separable,
    ))


_register("task_arithmetic", task_arithmetic, normalize=False, rescale=False,
          reference=_TASK_ARITHMETIC, summary="base + lambda * weighted sum of task vectors",
          row_separable=every_tensor)
_register("ties", ties, normalize=True, rescale=False, reference=_TIES,
          summary="trim task vectors by magnitude, elect signs, disjoint mean")
_register("dare_linear", dare_linear, normalize=False, rescale=True, stochastic=True,
          reference=_DARE, summary="random drop with 1/density rescale, weighted sum")
_register("dare_ties", dare_ties, normalize=False, rescale=True, stochastic=True,
          reference=_DARE, summary="random drop with 1/density rescale, TIES sign election")
_register("breadcrumbs", breadcrumbs, (_GAMMA,), normalize=False, rescale=False,
          reference=_BREADCRUMBS, summary="drop outliers and small deltas, weighted sum")
_register("breadcrumbs_ties", breadcrumbs_ties, (_GAMMA,), normalize=False, rescale=False,
          reference=_BREADCRUMBS, summary="drop outliers and small deltas, TIES sign election")
_register("della", della, (_EPSILON,), normalize=True, rescale=True, stochastic=True,
          reference=_DELLA, summary="magnitude-ranked random drop (MAGPRUNE), TIES sign election",
          check=_check_della)
_register("della_linear", della_linear, (_EPSILON,), normalize=False, rescale=True,
          stochastic=True, reference=_DELLA,
          summary="magnitude-ranked random drop (MAGPRUNE), weighted sum", check=_check_della)

_TALL_LAMBDA = Param("tall_mask_lambda", float, 0.4, per_model=True, low=0.0,
                     doc="lambda_t of the TALL mask |tau_t| >= lambda_t |tau_MTL - tau_t|")
_CONSENSUS_K = Param("consensus_k", int, 2, low=0,
                     doc="keep entries that are in at least this many TALL masks")

register(MethodSpec(
    name="consensus_ta", fn=consensus_ta,
    params=(weight_param(), _lambda(),
            Param("normalize", bool, False, doc="divide tau_MTL by the sum of the weights"),
            _TALL_LAMBDA, _CONSENSUS_K),
    base=BasePolicy.REQUIRED, min_models=1, reference=_TALL,
    summary="task arithmetic keeping only entries shared by >= k tasks (TALL masks)",
    check_params=_check_consensus,
    # Entry-wise: the TALL masks compare each entry of tau_t with the same entry of tau_MTL.
    row_separable=every_tensor,
))
register(MethodSpec(
    name="consensus_ties", fn=consensus_ties,
    params=(weight_param(), density_param(0.2), _lambda(),
            Param("normalize", bool, False,
                  doc="disjoint mean instead of the paper's disjoint sum"),
            _TALL_LAMBDA, _CONSENSUS_K),
    base=BasePolicy.REQUIRED, min_models=1, reference=_TALL,
    summary="TIES keeping only entries shared by >= k tasks (TALL masks)",
    check_params=_check_consensus,
))
