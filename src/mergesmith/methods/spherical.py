"""Spherical merges: slerp, nuslerp, multislerp and karcher.

Each treats a tensor (or each row of it) as a point on a hypersphere and moves
along great circles instead of straight lines, so that interpolating two
weights of similar norm does not shrink the result the way averaging does.
Semantics follow mergekit 0.1.5; the deliberate differences are listed in
docs/methods/spherical.md and marked "Deliberate difference" below.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from mergesmith.methods.base import (
    BasePolicy,
    MethodSpec,
    Param,
    TensorGroup,
    register,
    weight_param,
)

# mergekit's slerp thresholds: |cos θ| above SLERP_DOT_THRESHOLD interpolates
# linearly; norms at or below SLERP_NORM_EPS count as zero.
SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8
# mergekit's nuslerp: norms are floored at NUSLERP_NORM_FLOOR; a pair is colinear
# when sin²θ = 1 - cos²θ <= NUSLERP_EPS².
NUSLERP_NORM_FLOOR = 1e-7
NUSLERP_EPS = 1e-8
# nuslerp interpolates halfway when its two weights sum to (nearly) zero.
NUSLERP_ZERO_TOTAL = 1e-6
# karcher rows whose angle to the current mean exceeds 3π/4 (θ/sin θ > 3.3).
NEAR_ANTIPODE_COS = -math.sqrt(0.5)
# multislerp refuses to normalise weights whose sum is this close to zero.
ZERO_WEIGHT_SUM = 1e-8


# --- shared pieces -----------------------------------------------------------------

# torch.dot and torch.linalg.vector_norm accumulate float32 along the whole length:
# at 10M entries their relative error reaches ~1e-4, enough to move a cosine across
# slerp's 0.9995 threshold. One batched product of short blocks, with the block sums
# added in float64, keeps it near 1e-7 even for bf16-valued weights (whose few
# mantissa bits make long float32 sums round badly), in a single kernel call.
DOT_BLOCK = 64


def dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """<x, y> of two same-shape tensors taken as flat vectors, as a Python float."""
    x, y = x.reshape(-1), y.reshape(-1)
    blocks = x.numel() // DOT_BLOCK
    split = blocks * DOT_BLOCK
    total = float(torch.dot(x[split:], y[split:]))
    if blocks:
        per_block = torch.bmm(x[:split].view(blocks, 1, DOT_BLOCK),
                              y[:split].view(blocks, DOT_BLOCK, 1))
        total += float(per_block.sum(dtype=torch.float64))
    return total


def cosine(dot_xy: float, sq_x: float, sq_y: float) -> torch.Tensor:
    """<x, y> / sqrt(|x|² |y|²) in float64, clamped to [-1, 1], as a float32 scalar.

    One square root of the product (not |x|·|y|) makes exact antipodes and equal
    directions give exactly -1 and 1. The result is rounded to float32 so that the
    colinearity tests that follow see mergekit's float32 resolution.

    Deliberate difference: mergekit's float32 sums can land a hair inside ±1 for
    exact antipodes, which sends nuslerp down its spherical branch (limit
    cos(tπ)·v0) instead of the linear one ((1 - 2t)·v0), depending on rounding.
    """
    cos = dot_xy / math.sqrt(sq_x * sq_y)
    return torch.tensor(min(1.0, max(-1.0, cos)), dtype=torch.float32)


def slerp_coefficients(cos_theta: torch.Tensor, t: float,
                       linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shoemake's weights of the two endpoints, elementwise over ``cos_theta``.

        c0 = sin((1 - t) θ) / sin θ,   c1 = sin(t θ) / sin θ,   θ = arccos(cos θ)

    and (c0, c1) = (1 - t, t) wherever ``linear`` is set (nearly colinear pairs,
    where sin θ is too small to divide by).
    """
    # θ is taken at cos = 0 on the linear branch so that branch stays finite.
    theta = torch.acos(torch.where(linear, 0.0, cos_theta))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def combine_pair(x: torch.Tensor, y: torch.Tensor,
                 c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """c0 * x + c1 * y, with c0 and c1 broadcast; one fused pass after the first."""
    out = x * c0
    out.addcmul_(y, c1)
    return out


def flat_stack(tensors: list[torch.Tensor], minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensors (less ``minus``) flattened into the rows of a new [n, numel] matrix."""
    rows = torch.empty((len(tensors), tensors[0].numel()), dtype=tensors[0].dtype,
                       device=tensors[0].device)
    for row, x in zip(rows, tensors):
        if minus is None:
            row.copy_(x.reshape(-1))
        else:
            torch.sub(x.reshape(-1), minus.reshape(-1), out=row)
    return rows


def norm(x: torch.Tensor) -> float:
    return math.sqrt(dot(x, x))


def row_dots(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """<rows[i], v> for every row, each summed as accurately as ``dot``."""
    return torch.tensor([dot(row, v) for row in rows], dtype=torch.float32)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    return torch.tensor([norm(row) for row in rows], dtype=torch.float32)


# --- slerp -------------------------------------------------------------------------


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation of two whole tensors (Shoemake 1985).

        cos θ = <v0, v1> / (|v0| |v1|)
        slerp = sin((1 - t) θ)/sin θ · v0 + sin(t θ)/sin θ · v1
        lerp  = (1 - t) v0 + t v1           when |cos θ| > 0.9995

    The raw (not normalised) tensors are interpolated, as in mergekit; a norm at
    or below 1e-8 is replaced by 1, so a zero tensor gives cos θ = 0.
    """
    sq0, sq1 = dot(v0, v0), dot(v1, v1)
    floor = SLERP_NORM_EPS ** 2
    cos_theta = cosine(dot(v0, v1), sq0 if sq0 > floor else 1.0, sq1 if sq1 > floor else 1.0)
    c0, c1 = slerp_coefficients(cos_theta, t, cos_theta.abs() > SLERP_DOT_THRESHOLD)
    return combine_pair(v0, v1, c0, c1)


def slerp(group: TensorGroup) -> torch.Tensor:
    """slerp(t; base, other): t = 0 gives the base model, t = 1 the other one."""
    (other,), _ = group.others()
    return slerp_tensors(float(group.params["t"]), group.base, other)


# --- nuslerp -----------------------------------------------------------------------


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor,
                    row_wise: bool, flatten: bool) -> torch.Tensor:
    """Slerp of the whole tensors (``flatten``) or of matching slices of them.

    Slices run along the last dimension (each row of a 2-D weight), or along
    dimension 0 when ``row_wise`` (each column of a 2-D weight); mergekit's naming.
    Per slice:

        cos θ = <v0, v1> / (max(|v0|, 1e-7) · max(|v1|, 1e-7))
        sin((1 - t) θ)/sin θ · v0 + sin(t θ)/sin θ · v1,
        or (1 - t) v0 + t v1 when 1 - cos²θ <= 1e-16.
    """
    floor = NUSLERP_NORM_FLOOR ** 2
    if flatten or v0.ndim <= 1:
        cos_theta = cosine(dot(v0, v1), max(dot(v0, v0), floor), max(dot(v1, v1), floor))
    else:
        dim = 0 if row_wise else -1
        sq0 = (v0 * v0).sum(dim=dim, keepdim=True).clamp(min=floor)
        sq1 = (v1 * v1).sum(dim=dim, keepdim=True).clamp(min=floor)
        cos_theta = ((v0 * v1).sum(dim=dim, keepdim=True) / (sq0 * sq1).sqrt()).clamp(-1.0, 1.0)
    colinear = (1.0 - cos_theta.square()) <= NUSLERP_EPS ** 2
    c0, c1 = slerp_coefficients(cos_theta, t, colinear)
    return combine_pair(v0, v1, c0, c1)


def nuslerp_fraction(weights: list[float]) -> float:
    """t = w1 / (w0 + w1), or 1/2 when the weights sum to (nearly) zero."""
    total = sum(weights)
    return 0.5 if abs(total) < NUSLERP_ZERO_TOTAL else weights[1] / total


def nuslerp(group: TensorGroup) -> torch.Tensor:
    """Slerp of two models at t = w1 / (w0 + w1); with a base, slerp of the task
    vectors (model - base), added back to the base."""
    (first, second), model_params = group.others()
    t = nuslerp_fraction([p["weight"] for p in model_params])
    row_wise = bool(group.params["nuslerp_row_wise"])
    flatten = bool(group.params["nuslerp_flatten"])
    if group.base_index is None:
        return nuslerp_tensors(t, first, second, row_wise, flatten)
    base = group.base
    merged = nuslerp_tensors(t, first - base, second - base, row_wise, flatten)
    return merged.add_(base)


# --- multislerp --------------------------------------------------------------------


def normalized_weights(weights: list[float], normalize: bool, name: str) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32)
    if not normalize:
        return w
    total = float(w.sum())
    if abs(total) < ZERO_WEIGHT_SUM:
        raise ValueError(f"{name}: the multislerp weights sum to zero, which "
                         "normalize_weights: true cannot divide by; change a weight "
                         "or set normalize_weights: false")
    return w / total


def weighted_rows(vectors: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """Σ_i c_i · vectors[i], each product rounded before it is added.

    A matrix product may fuse multiply and add, so rows that cancel exactly (a and -a
    with equal weights) would leave rounding noise on some CPUs; this sums to exactly 0
    on every platform.
    """
    total = vectors[0] * coefficients[0]
    for row, c in zip(vectors[1:], coefficients[1:]):
        total.add_(row * c)
    return total


def multislerp_vectors(vectors: torch.Tensor, weights: torch.Tensor,
                       eps: float, name: str) -> torch.Tensor:
    """mergekit's multislerp of the rows of ``vectors`` (shape [n, numel]).

    mergekit projects the unit directions u_i = x_i / (|x_i| + eps) onto the
    tangent space at m = Σ w_i u_i / |Σ w_i u_i|, averages them there and maps
    back with the exponential map. The weighted tangent average is
    Σ w_i (u_i - <u_i, m> m) = Σ w_i u_i - |Σ w_i u_i| m = 0 identically, and
    exp_m(v) = cos(|v| + eps) m + sin(|v| + eps)/(|v| + eps) · v, so the result is

        merged = cos(eps) · m · Σ w_i |x_i|

    which is what is computed here, without the zero tangent step. When
    |Σ w_i u_i| < eps the directions cancel; mergekit then falls back to
    Σ w_i x_i for two models and raises otherwise.
    """
    norms = row_norms(vectors)
    direction = weighted_rows(vectors, (weights / (norms + eps)).tolist())
    direction_norm = norm(direction)
    if direction_norm < eps:
        # Deliberate difference: mergekit raises for three or more models even
        # when every task vector is zero (all models equal the base for this
        # tensor); the linear fallback then gives the only sensible answer, 0.
        if vectors.shape[0] == 2 or not bool(norms.any()):
            return weighted_rows(vectors, weights.tolist())
        raise ValueError(f"{name}: the weighted directions of the models cancel out "
                         "(e.g. task vectors a and -a with equal weights), so "
                         "multislerp has no direction to follow; change a model's weight")
    scale = math.cos(eps) * float(weights @ norms) / direction_norm
    return direction.mul_(scale)


def multislerp(group: TensorGroup) -> torch.Tensor:
    """Spherical barycentre of the models (or of their task vectors with a base)."""
    others, model_params = group.others()
    if len(others) == 1:
        return others[0].clone()
    weights = normalized_weights([p["weight"] for p in model_params],
                                 bool(group.params["normalize_weights"]), group.name)
    base = None if group.base_index is None else group.base
    vectors = flat_stack(others, minus=base)
    merged = multislerp_vectors(vectors, weights, float(group.params["eps"]), group.name)
    merged = merged.reshape(others[0].shape)
    return merged if base is None else merged.add_(base)


def _check_multislerp(params: dict[str, Any], model_params: list[dict[str, Any]]) -> list[str]:
    weights = [p["weight"] for p in model_params if "weight" in p]
    if (params["normalize_weights"] and len(weights) > 1
            and abs(sum(weights)) < ZERO_WEIGHT_SUM):
        return ["the weights sum to zero, which normalize_weights: true cannot divide by; "
                "change a weight or set normalize_weights: false"]
    return []


# --- karcher -----------------------------------------------------------------------


def karcher_direction(vectors: torch.Tensor, norms: torch.Tensor, alphas: torch.Tensor,
                      max_iter: int, tol: float) -> Optional[torch.Tensor]:
    """Weighted Karcher (Fréchet) mean on the unit sphere of the rows' directions.

    Rows with |x_i| <= tol are left out and the weights renormalised over the rest.
    Starting from the normalised weighted mean of u_i = x_i / |x_i|, repeat

        θ_i = arccos <m, u_i>
        v   = Σ a_i θ_i / sin θ_i · (u_i - <m, u_i> m)       (rows with θ_i < tol skipped)
        m   ← cos|v| · m + sin|v| · v/|v|,  renormalised

    until |v| < tol or ``max_iter`` steps. Returns None when no row is kept.
    """
    kept = norms > tol
    if not bool(kept.any()):
        return None
    inv_norms = torch.where(kept, 1.0 / norms, 0.0)
    weights = torch.where(kept, alphas, 0.0)
    weights = weights / weights.sum()

    start = (weights * inv_norms) @ vectors
    start_norm = norm(start)
    if start_norm < tol:
        first = int(kept.nonzero()[0])
        # Division, not the reciprocal, so that an exact antipode of this row
        # has cosine exactly -1 below, as in mergekit.
        mean = vectors[first] / norms[first]
    else:
        mean = start.div_(start_norm)

    for _ in range(max_iter):
        cos_theta = (row_dots(vectors, mean) * inv_norms).clamp(-1.0, 1.0)
        far = (kept & (cos_theta < NEAR_ANTIPODE_COS)).nonzero().flatten().tolist()
        far_units = {i: vectors[i] / norms[i] for i in far}
        # Dividing by <m, m> (1 up to rounding) makes an exact antipode u = -m give
        # c = -1 exactly, whatever order the platform's dot sums in, so its tangent
        # u - c m below is exactly zero.
        mean_sq = dot(mean, mean) if far_units else 1.0
        for i, unit in far_units.items():
            cos_theta[i] = min(1.0, max(-1.0, dot(mean, unit) / mean_sq))
        theta = torch.acos(cos_theta)
        pull = torch.where(theta < tol, 0.0, weights * theta / torch.sin(theta))
        near_pull = pull.clone()
        near_pull[far] = 0.0
        # Σ p_i (u_i - c_i m) = (Σ (p_i/|x_i|) x_i) - (Σ p_i c_i) m, computed on the
        # raw rows so no matrix of unit vectors is ever built.
        tangent = (near_pull * inv_norms) @ vectors
        tangent.sub_(mean, alpha=float(near_pull @ cos_theta))
        # Near the antipode θ/sin θ explodes (about 4e7 at θ = π in float32), so the
        # regrouped sum above would amplify rounding; those rows form u_i - c_i m
        # first, as mergekit does, which is exactly zero for an exact antipode.
        for i, unit in far_units.items():
            tangent.add_(unit - cos_theta[i] * mean, alpha=float(pull[i]))
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = mean.mul_(math.cos(tangent_norm)).add_(
            tangent, alpha=math.sin(tangent_norm) / tangent_norm)
        mean_norm = norm(mean)
        if mean_norm > tol:
            mean.div_(mean_norm)
    return mean


def karcher(group: TensorGroup) -> torch.Tensor:
    """Karcher mean of the models' directions, scaled by their mean norm.

        merged = (1/n Σ |x_i|) · KarcherMean(x_1/|x_1|, ..., x_n/|x_n|)
    """
    tensors = group.tensors
    if len(tensors) == 1:
        return tensors[0].clone()
    vectors = flat_stack(tensors)
    norms = row_norms(vectors)
    alphas = torch.full((len(tensors),), 1.0 / len(tensors))
    mean = karcher_direction(vectors, norms, alphas,
                             int(group.params["max_iter"]), float(group.params["tol"]))
    if mean is None:
        return torch.zeros_like(tensors[0])
    # The scale averages every norm, the ones left out of the direction included.
    return mean.mul_(float(alphas @ norms)).reshape(tensors[0].shape)


# --- registration ------------------------------------------------------------------

register(MethodSpec(
    name="slerp",
    fn=slerp,
    params=(Param("t", float, usual=(0.0, 1.0), doc="interpolation factor: 0 gives the base model, "
                  "1 the other model"),),
    base=BasePolicy.REQUIRED,
    min_models=1,
    max_models=1,
    reference="https://doi.org/10.1145/325165.325242",
    summary="spherical interpolation between the base and one other model",
))

register(MethodSpec(
    name="nuslerp",
    fn=nuslerp,
    params=(weight_param(),
            Param("nuslerp_flatten", bool, True,
                  doc="interpolate whole tensors instead of slices"),
            Param("nuslerp_row_wise", bool, False,
                  doc="with nuslerp_flatten: false, slices along dimension 0 "
                      "(columns) instead of the last dimension (rows)")),
    base=BasePolicy.OPTIONAL,
    min_models=2,
    max_models=2,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    summary="slerp of two models at t = w1/(w0+w1), of task vectors when a base is given",
))

register(MethodSpec(
    name="multislerp",
    fn=multislerp,
    params=(weight_param(),
            Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
            Param("eps", float, 1e-8, low=0.0, high=1.0, low_open=True, high_open=True,
                  doc="numerical-stability constant added to norms")),
    base=BasePolicy.OPTIONAL,
    min_models=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="spherical barycentre of any number of models (of task vectors with a base)",
    check_params=_check_multislerp,
))

register(MethodSpec(
    name="karcher",
    fn=karcher,
    params=(Param("max_iter", int, 10, low=0, doc="most iterations of the mean"),
            Param("tol", float, 1e-5, low=0.0,
                  doc="convergence tolerance; norms at or below it count as zero")),
    base=BasePolicy.IGNORED,
    min_models=1,
    reference="https://doi.org/10.1002/cpa.3160300502",
    summary="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
))
