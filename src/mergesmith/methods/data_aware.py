"""Merges weighted by calibration statistics: RegMean and Fisher merging.

Both read statistics that ``mergesmith.calibrate`` computed on each model's own
calibration data and that the engine hands over in ``group.stats`` (see
docs/methods/data_aware.md for the formulas and every deviation).

**RegMean** (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023, https://arxiv.org/abs/2212.09849). For a linear layer y = W x
with W of shape [out, in] (Hugging Face's convention) and G_t = mean over tokens of
x xᵀ, the Gram matrix of model t's inputs, [in, in]:

    G̃_t = alpha * G_t + (1 - alpha) * diag(G_t)          (off-diagonal scaled by alpha)
    W*ᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ                        (solved, never inverted)

Every tensor without a Gram (norms, biases, embeddings) is the plain average, the
paper's rule.

**RegMean++** (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization
of Regression Mean for Model Merging", 2025, https://arxiv.org/abs/2508.03121). The
same merge step, on different Grams: those of block l are taken on calibration
activations that already passed the *merged* blocks below it (each expert's own
block l applied to them). ``mergesmith.calibrate.sequential`` collects them, merging
block by block through this very function, and caches them as ``gram_plusplus``.

**Fisher merging** (Matena & Raffel, "Merging Models with Fisher-Weighted
Averaging", NeurIPS 2022, https://arxiv.org/abs/2111.09832). Element-wise, with
F_t the diagonal Fisher of model t and λ_t its ``weight``:

    θ* = Σ_t λ'_t (F_t + ε) θ_t / Σ_t λ'_t (F_t + ε)
    λ'_t = λ_t * (1 / (‖F_t‖ + ε)) / Σ_s (1 / (‖F_s‖ + ε))   (normalize_fisher: true)

where ‖F_t‖ is the L2 norm of model t's whole Fisher (over every tensor), so that a
model whose Fisher is larger overall (a sharper loss) does not outvote the others;
with ``normalize_fisher: false``, λ'_t = λ_t.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from mergesmith.methods.base import MethodSpec, Param, TensorGroup, every_tensor, register

# Above this the solve loses most of float32's ~7 significant digits.
CONDITION_WARNING = 1e6
RIDGE = 1e-6  # relative to the mean diagonal of Σ G̃, added only when the sum is singular
RIDGE_STEPS = 6  # each retry multiplies the ridge by 100


# Rows of a weight turned into float64 at once by the RegMean step (about 64 MiB of them), so that a
# vocabulary-sized lm_head never has a whole float64 copy, product or solution beside its inputs.
BLOCK_BYTES = 64 * 1024 ** 2


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The entry-wise mean, summed in place: no stacked copy of every input. 16-bit inputs are summed
    in float32, as torch's ``mean`` accumulates them, so the result equals
    ``torch.stack(tensors).mean(0)`` bit for bit in every float dtype (tested)."""
    dtype = tensors[0].dtype
    accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = tensors[0].to(accumulate, copy=True)
    for t in tensors[1:]:
        out.add_(t)
    return out.div_(len(tensors)).to(dtype)


def _row_blocks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = alpha * G with its diagonal left as it is."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def spd_factor(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The Cholesky factor of a symmetric positive (semi)definite ``matrix``, for ``torch.cholesky_solve``.

    A singular matrix (e.g. an input feature that is always zero in the calibration
    data) gets a ridge of ``RIDGE * mean(diag)`` on its diagonal, multiplied by 100
    until the factorization succeeds, with a warning. The condition number is
    estimated from the Cholesky factor, cond ≈ (max L_ii / min L_ii)², a lower bound
    that costs nothing next to the factorization; a large one is warned about.
    """
    scale = matrix.diagonal().mean().clamp_min(torch.finfo(matrix.dtype).tiny)
    ridge = 0.0
    for step in range(RIDGE_STEPS + 1):
        if ridge:
            shifted = matrix.clone()
            shifted.diagonal().add_(ridge * scale)
        else:
            shifted = matrix
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            break
        ridge = RIDGE if step == 0 else ridge * 100
    else:
        raise ValueError(f"{name}: the summed Gram matrix is not positive definite even with a ridge of "
                         f"{ridge:g} x its mean diagonal; check the calibration statistics")
    if ridge:
        warnings.warn(f"{name}: the summed Gram matrix is singular; solved with a ridge of {ridge:g} x its "
                      "mean diagonal (some input features never vary on the calibration data)", stacklevel=3)
    diag = factor.diagonal()
    condition = float((diag.max() / diag.min()) ** 2)
    if condition > CONDITION_WARNING:
        warnings.warn(f"{name}: the summed Gram matrix has a condition number of about {condition:.1e}; "
                      "the RegMean solve may be inaccurate (lower alpha, or add calibration data)", stacklevel=3)
    return factor


def _stats_of(group: TensorGroup, kind: str) -> Optional[list[torch.Tensor]]:
    """Every input's statistic ``kind``, or None when one input lacks it."""
    if group.stats is None:
        return None
    found = [s.get(kind) for s in group.stats]
    return None if any(x is None for x in found) else found


def regmean(group: TensorGroup) -> torch.Tensor:
    grams = _stats_of(group, "gram")
    weights = group.tensors
    if grams is None or weights[0].dim() != 2:
        return average(weights)
    alpha = group.params["alpha"]
    # float64: the solve amplifies rounding by the condition number, and Gram sums are wide.
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    out_features, in_features = weights[0].shape
    rhs = torch.zeros(in_features, out_features, dtype=torch.float64, device=weights[0].device)
    # Blocks of output rows (columns of rhs): each column of rhs, and of the solution, depends on the
    # same row of the weights alone, so a block never holds a float64 copy of a whole weight.
    blocks = _row_blocks(out_features, 8 * in_features)
    for gram, weight in zip(grams, weights):
        if gram.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"{group.name}: Gram matrix of shape {list(gram.shape)} does not fit a weight of "
                             f"shape {list(weight.shape)} (expected [in, in] = {[weight.shape[1]] * 2}); "
                             "the statistics belong to another model: recompute them")
        scaled = scale_off_diagonal(gram.to(torch.float64), alpha)
        total += scaled
        for lo, hi in blocks:
            rhs[:, lo:hi] += scaled @ weight[lo:hi].to(torch.float64).T
    factor = spd_factor(total, group.name)
    out = torch.empty_like(weights[0])
    for lo, hi in blocks:
        out[lo:hi] = torch.cholesky_solve(rhs[:, lo:hi], factor).T
    return out


def regmean_plusplus(group: TensorGroup) -> torch.Tensor:
    """RegMean's step (``regmean``) on the Grams RegMean++ collected (``group.stats[i]["gram_plusplus"]``)."""
    stats = None if group.stats is None else \
        [{"gram": s["gram_plusplus"]} if "gram_plusplus" in s else {} for s in group.stats]
    return regmean(dataclasses.replace(group, stats=stats))


# Entries of a mixed-dtype product taken at a time: the CPU kernels first copy a float32 operand
# whole to float64, so ``_multiply_into`` hands them slices to keep that copy at 8 MiB.
PRODUCT_SLICE = 2 ** 20


def _multiply_into(out: torch.Tensor, factor: torch.Tensor) -> None:
    """``out *= factor`` for a contiguous ``out`` and a ``factor`` of its shape (perhaps of a narrower
    dtype), slice by slice; entry-wise, so the bits are those of one whole ``out.mul_(factor)``."""
    for out_slice, factor_slice in zip(out.view(-1).split(PRODUCT_SLICE), factor.reshape(-1).split(PRODUCT_SLICE)):
        out_slice.mul_(factor_slice)


def fisher(group: TensorGroup) -> torch.Tensor:
    """θ* = Σ_t λ'_t (F_t + ε) θ_t / Σ_t λ'_t (F_t + ε), entry by entry, in float64 (module docstring).

    Workspace: the numerator, the denominator and one float64 tensor of the tensor's size
    (λ'_t (F_t + ε), then times θ_t), each op in place, one model at a time.
    """
    fishers = _stats_of(group, "fisher")
    if fishers is None:
        return average(group.tensors)
    eps = group.params["epsilon"]
    coefficients = torch.tensor([p["weight"] for p in group.model_params], dtype=torch.float64)
    if group.params["normalize_fisher"]:
        norms = torch.stack([s["fisher_norm"].to(torch.float64).cpu() for s in group.stats])
        inverse = 1.0 / (norms + eps)
        coefficients = coefficients * inverse / inverse.sum()
    first = group.tensors[0]
    numerator = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    denominator = torch.zeros_like(numerator)
    weighted = torch.empty_like(numerator)
    for c, f, theta in zip(coefficients.tolist(), fishers, group.tensors):
        if f.shape != theta.shape:
            raise ValueError(f"{group.name}: Fisher of shape {list(f.shape)} does not fit the tensor's shape "
                             f"{list(theta.shape)}; the statistics belong to another model: recompute them")
        weighted.copy_(f).add_(eps).mul_(c)  # λ'_t (F_t + ε)
        denominator.add_(weighted)
        _multiply_into(weighted, theta)
        numerator.add_(weighted)
    return numerator.div_(denominator).to(first.dtype)


_ALPHA = Param("alpha", float, 0.1, low=0.0, high=1.0,
               doc="scale of the Gram matrices' off-diagonal entries (1: exact regression, 0: diagonal)")

register(MethodSpec(
    name="regmean",
    fn=regmean,
    params=(_ALPHA,),
    min_models=2,
    needs_stats=("gram",),
    reference="https://arxiv.org/abs/2212.09849",
    summary="least-squares merge of linear layers from each model's input Gram matrices",
))

register(MethodSpec(
    name="regmean_plusplus",
    fn=regmean_plusplus,
    params=(_ALPHA,),
    min_models=2,
    needs_stats=("gram_plusplus",),
    reference="https://arxiv.org/abs/2508.03121",
    summary="RegMean with each block's Grams taken on activations through the merged blocks below it",
))

register(MethodSpec(
    name="fisher",
    fn=fisher,
    params=(Param("weight", float, 1.0, per_model=True, on_base=True, low=0.0,
                  doc="the model's scaling coefficient λ"),
            Param("epsilon", float, 1e-6, low=0.0, doc="floor added to every Fisher entry"),
            Param("normalize_fisher", bool, True, doc="divide each model's Fisher by its whole-model L2 norm")),
    min_models=2,
    needs_stats=("fisher",),
    reference="https://arxiv.org/abs/2111.09832",
    summary="element-wise average weighted by each model's diagonal Fisher",
    # Entry-wise, the fallback average too; the engine hands a row block its rows of each Fisher
    # and the whole-model norms (scalars) whole. RegMean's Grams span every row: it stays whole.
    row_separable=every_tensor,
))
