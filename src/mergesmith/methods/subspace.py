"""Subspace merges: methods that work on the singular-value structure of each weight matrix.

With task vectors tau_t = theta_t - theta_0 scaled by each model's ``weight`` first
(tau_t <- w_t tau_t, before any decomposition), T models and r = min(m, n):

    tsv_m    theta_0 + lambda * polar[U_1k..U_Tk] diag(s) polar[V_1k..V_Tk]^T, k = floor(r/T)
                                                             Gargiulo et al., CVPR 2025
    iso_c    theta_0 + lambda * mean(sigma(M)) polar(M),  M = sum_t tau_t
                                                             Marczak et al., ICML 2025
    iso_cts  iso_c on the common top subspace of M plus floor-ish((1-f) r / T) directions
             of each tau_t outside it                        Marczak et al., ICML 2025
    star     theta_0 + lambda * mean_t STAR(tau_t): keep the top singular values holding
             eta% of the nuclear norm, rescale them to the full nuclear norm
                                                             Lee et al., NAACL 2025
    cart     theta_avg + lambda * sum_t lowrank_k(tau_t - tau_avg), k = rank_ratio * r
                                                             Choi et al. 2025

Every 2-D tensor is decomposed except those indexed by the vocabulary (embeddings, lm_head),
which join only with ``include_embeddings: true``. The rest (1-D tensors, vocabulary tensors)
get theta_0 + lambda * (1/T) sum_t tau_t (TSV-M, Iso-C, Iso-CTS, STAR, as FusionBench), or
theta_avg for CART (its centered task vectors sum to zero there).

Exactness: the singular triplets come from ``eigh`` of the smaller Gram matrix in float64,
1.4 to 4.4 times faster than a float32 ``torch.linalg.svd`` on CPU (512-wide matrices, two
cores) and more accurate than it for every direction above the float32 noise floor (see ``singular_triplets``). Directions
below that floor (sigma <= max(m, n) * eps_float32 * sigma_1) are treated as exactly zero,
so rank-deficient inputs (LoRA experts) give a deterministic result where an SVD would pick
arbitrary null-space vectors. See docs/methods/subspace.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergesmith.methods.base import (
    BasePolicy, MethodSpec, Param, TensorGroup, include_embeddings_param, is_decomposed, not_decomposed, register,
    weight_param,
)
from mergesmith.methods.task_arithmetic import apply_task_vector, task_vectors

_EPS32 = torch.finfo(torch.float32).eps

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m, k), s (k,), Vh (k, n)


# ---------------------------------------------------------------- linear algebra

def _floor_reference(s: torch.Tensor, sigma_1: Optional[torch.Tensor]) -> torch.Tensor:
    """The scale the noise floor is relative to: the largest of ``s``, or ``sigma_1`` if larger."""
    top = s.max() if s.numel() else s.new_zeros(())
    return top if sigma_1 is None else torch.maximum(top, torch.as_tensor(sigma_1, dtype=s.dtype, device=s.device))


def gram_spectrum(gram: torch.Tensor, dims: tuple[int, int],
                  sigma_1: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, Q, kept) from ``eigh`` of the float64 Gram matrix of a ``dims``-shaped matrix, largest
    first: the singular values s (0 at or below the float32 noise floor, see
    ``singular_triplets``), every eigenvector as a column of Q, and which are above the floor."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    # eigh sorts ascending; we want the largest first.
    s = eigenvalues.flip(0).clamp_min(0).sqrt()
    sigma_1 = _floor_reference(s, sigma_1)
    kept = s > max(dims) * _EPS32 * sigma_1
    return s * kept, eigenvectors.flip(1), kept


def _safe(s: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """s with its dropped entries set to 1, to divide by."""
    return torch.where(kept, s, torch.ones_like(s))


def singular_triplets(matrix: torch.Tensor, k: Optional[int] = None,
                      sigma_1: Optional[torch.Tensor] = None) -> Triplets:
    """The top ``k`` (default all r = min(m, n)) singular triplets of ``matrix``, in float64.

    Computed from ``eigh`` of the smaller Gram matrix A^T A (or A A^T) in float64, then
    U = A V / s. The float64 Gram keeps every singular value above the float32 noise floor
    to better than float32 relative accuracy: its error is eps64 * sigma_1^2, and a kept
    sigma is at least max(m, n) * eps32 * sigma_1. Triplets at or below that floor are
    returned as zeros (u = 0, s = 0, v = 0): the input, being float32, does not determine
    them, and a zero triplet drops out of every product and polar factor below. For a matrix
    derived from a larger one (a projection of it), ``sigma_1`` is the larger one's scale, so
    that what is left of it at rounding level counts as zero.
    """
    a = matrix.to(torch.float64)
    m, n = a.shape
    wide = m < n
    if wide:
        a = a.T
    s, v, kept = gram_spectrum(a.T @ a, (m, n), sigma_1)
    if k is not None:
        s, v, kept = s[:k], v[:, :k], kept[:k]
    v = v * kept
    u = (a @ v) / _safe(s, kept)
    if wide:
        u, v = v, u
    return u, s, v.T


def inverse_sqrt_on_range(gram: torch.Tensor, dims: tuple[int, int],
                          sigma_1: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, s) for the float64 Gram matrix ``gram`` (A^T A or A A^T) of a ``dims``-shaped A:
    W = Q diag(1/s) Q^T on the directions above the float32 noise floor of
    ``singular_triplets`` (0 on the others), s the singular values (floored to 0 there).
    For A a block of a larger matrix whose other block is orthogonal to it, ``sigma_1`` is the
    other block's largest singular value, so that the floor is the whole matrix's.

    A W (or W A, for A A^T) is A's polar factor: with A^T A = V diag(s^2) V^T, A V diag(1/s)
    V^T = U V^T. Computing it this way needs one product of A's size where U = A V / s
    followed by U V^T needs two, and lets a product of polar factors be formed on the small
    side (``polar_product``)."""
    s, q, kept = gram_spectrum(gram, dims, sigma_1)
    return (q * (kept / _safe(s, kept))) @ q.T, s


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U V^T of ``matrix`` (float64): the nearest matrix with
    orthonormal columns (rows, if wide), on the numerical range of ``matrix``."""
    a = matrix.to(torch.float64)
    if a.shape[0] < a.shape[1]:
        return inverse_sqrt_on_range(a @ a.T, a.shape)[0] @ a
    return a @ inverse_sqrt_on_range(a.T @ a, a.shape)[0]


def polar_product(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """polar(u) diag(s) polar(vh), for u (m x R) and vh (R x n) with R <= m and R <= n.

    As u W_u diag(s) W_v vh with W_u, W_v the R x R inverse square roots of u^T u and
    vh vh^T (``inverse_sqrt_on_range``): the only products of the matrix's size are u times
    an R x R matrix and that times vh. Forming the two polar factors first would cost three
    products of u's size and three of vh's, then the reconstruction."""
    w_u, _ = inverse_sqrt_on_range(u.T @ u, u.shape)
    w_v, _ = inverse_sqrt_on_range(vh @ vh.T, vh.shape)
    return (u @ ((w_u * s) @ w_v)) @ vh


def reconstruct(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U diag(s) V^T."""
    return (u * s) @ vh


def weighted_task_vectors(group: TensorGroup) -> list[torch.Tensor]:
    """w_t tau_t for every non-base model, in the models' storage when the engine allows."""
    models, model_params = group.others()
    deltas = task_vectors(group.base, models, inplace=group.disposable)
    for delta, mp in zip(deltas, model_params):
        if mp["weight"] != 1:
            delta.mul_(mp["weight"])
    return deltas


def sum_of(deltas: list[torch.Tensor]) -> torch.Tensor:
    """sum_t delta_t, in a new tensor."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    return total


def mean_of(deltas: list[torch.Tensor]) -> torch.Tensor:
    """(1/T) sum_t delta_t, in a new tensor."""
    return sum_of(deltas).div_(len(deltas))


def finish(group: TensorGroup, merged_delta: torch.Tensor) -> torch.Tensor:
    """theta_0 + lambda * merged_delta, in the compute dtype."""
    return apply_task_vector(group.base, merged_delta.to(group.base.dtype), group.params["lambda"])


def average_fallback(group: TensorGroup, deltas: list[torch.Tensor]) -> torch.Tensor:
    """theta_0 + lambda * (1/T) sum_t w_t tau_t, for tensors that are not decomposed."""
    return finish(group, mean_of(deltas))


# ---------------------------------------------------------------- TSV-M

def tsv_merge(triplets: list[Triplets]) -> torch.Tensor:
    """TSV-M's combination of each task's top singular triplets (U_t, s_t, V_t):

        U_hat = polar([U_1 .. U_T]),  V_hat = polar([V_1 .. V_T]),
        merged = U_hat diag([s_1 .. s_T]) V_hat^T

    Orthogonalizing the concatenated bases (the Procrustes step) is what removes the
    interference between tasks. Invariant to the signs an SVD picks: flipping (u_i, v_i)
    multiplies both bases by the same diagonal D, and polar(A D) = polar(A) D.
    """
    u = torch.cat([t[0] for t in triplets], dim=1)
    s = torch.cat([t[1] for t in triplets])
    vh = torch.cat([t[2] for t in triplets], dim=0)
    return polar_product(u, s, vh)


def tsv_m(group: TensorGroup) -> torch.Tensor:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025, https://arxiv.org/abs/2412.00081): keep the top k = floor(r/T)
    singular triplets of each w_t tau_t, orthogonalize the concatenated U and V by their polar
    factors, reconstruct, scale by lambda (the paper's alpha).

    Follows FusionBench's ``compute_and_sum_svd_mem_reduction`` (the authors' code): it
    orthogonalizes an m x r matrix holding the T*k columns and r - T*k zero columns, whose
    polar factor equals, on the T*k columns, the polar factor of the m x Tk matrix used here.
    FusionBench computes k as int(r * (1/T)), which float rounding can make one less than
    floor(r/T) (e.g. r = T = 49); we use floor(r/T). Only the top k triplets of each task are
    needed, never a full reconstruction of each tau_t.
    """
    deltas = weighted_task_vectors(group)
    if not is_decomposed(group):
        return average_fallback(group, deltas)
    k = min(group.base.shape) // len(deltas)
    if k == 0:  # more tasks than dimensions: no task gets a direction
        return finish(group, torch.zeros_like(group.base))
    triplets = []
    for i, delta in enumerate(deltas):
        triplets.append(singular_triplets(delta, k))
        deltas[i] = None  # let the engine's buffer go as soon as it is decomposed
    return finish(group, tsv_merge(triplets))


# ---------------------------------------------------------------- Iso-C and Iso-CTS

def iso_c(group: TensorGroup) -> torch.Tensor:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959):

        M = sum_t w_t tau_t = U diag(sigma) V^T,   merged = theta_0 + lambda * mean(sigma) U V^T

    the sum with its spectrum flattened to its mean singular value (over all r = min(m, n)).
    Only the polar factor U V^T and the nuclear norm of one matrix are needed. Paper and the
    authors' code (FusionBench ``iso_utils.iso_c``) agree.
    """
    deltas = weighted_task_vectors(group)
    if not is_decomposed(group):
        return average_fallback(group, deltas)
    total = sum_of(deltas).to(torch.float64)
    if total.shape[0] < total.shape[1]:
        w, s = inverse_sqrt_on_range(total @ total.T, total.shape)
        polar = w.mul_(s.mean()) @ total
    else:
        w, s = inverse_sqrt_on_range(total.T @ total, total.shape)
        polar = total @ w.mul_(s.mean())
    return finish(group, polar)


def iso_cts_split(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) of Iso-CTS, as the authors' code rounds them:
    the task-specific total round((r - int(r f)) / T) * T, the rest common. When that rounding
    would need more than r directions (f near 0), each task gets floor(r/T)."""
    per_task = round((r - int(r * common_space_fraction)) / tasks)
    if per_task * tasks > r:
        per_task = r // tasks
    return r - per_task * tasks, per_task


def iso_cts(group: TensorGroup) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): the common subspace of M = sum_t w_t tau_t plus
    each task's own directions outside it, then Iso-C's isotropic spectrum:

        U_c, s_c, V_c = top-c triplets of M                          (c ~ f * r common)
        U_t, s_t, V_t = top-d triplets of (I - U_c U_c^T) tau_t      (d = (r - c) / T each)
        merged = theta_0 + lambda * mean([s_c, s_1..s_T]) polar([U_c, U_1..U_T]) polar([V_c, V_1..V_T])^T

    Follows FusionBench's ``iso_utils.iso_cts`` (the authors' code), including its rounding of
    c and d; with f = 1 it is Iso-C exactly.

    How it is computed (same result, to float64 rounding): U_c is orthonormal and orthogonal to
    every U_t, so polar([U_c, U_1..U_T]) = [U_c, polar([U_1..U_T])], an eigendecomposition of
    T d x T d instead of r x r. When m <= n, U_c comes from the eigenvectors of M M^T, whose
    other m - c eigenvectors Q span the complement of U_c: (I - U_c U_c^T) tau_t = Q (Q^T tau_t),
    so each task's triplets come from a (m - c) x (m - c) Gram instead of an m x m one. What
    is left at full size is one decomposition of M's Gram and one for polar([V_c, V_1..V_T]).

    Where we differ: a task's directions outside U_c are kept only above the float32 noise
    floor of the task vector itself (max(m, n) eps32 ||tau_t||_F), not of what the projection
    leaves. When tau_t lies in U_c (LoRA experts, whose sum spans their ranges) the projection
    is rounding noise; an SVD of it (FusionBench) returns d arbitrary directions per task, and
    the polar factor gives each the weight mean(s) of a real one. Here they are zero.
    """
    deltas = weighted_task_vectors(group)
    if not is_decomposed(group):
        return average_fallback(group, deltas)
    m, n = group.base.shape
    common, per_task = iso_cts_split(min(m, n), len(deltas), group.params["common_space_fraction"])
    total = sum_of(deltas).to(torch.float64)
    if m <= n:
        s_all, q, kept = gram_spectrum(total @ total.T, (m, n))
        u_c, s_c = q[:, :common] * kept[:common], s_all[:common]
        vh_c = (u_c.T @ total) / _safe(s_c, kept[:common])[:, None]
        outside = ~kept
        outside[common:] = True
        complement = q[:, outside]  # the complement of U_c (directions of M below the floor too)

        def task_triplets(delta: torch.Tensor) -> Triplets:
            tau = delta.to(torch.float64)
            u, s, vh = singular_triplets(complement.T @ tau, per_task, torch.linalg.matrix_norm(tau))
            return complement @ u, s, vh  # same triplets as of the projected m x n tau_t
    else:
        u_c, s_c, vh_c = singular_triplets(total, common)

        def task_triplets(delta: torch.Tensor) -> Triplets:
            tau = delta.to(torch.float64)
            scale = torch.linalg.matrix_norm(tau)
            tau -= u_c @ (u_c.T @ tau)
            return singular_triplets(tau, per_task, scale)
    del total
    us, ss, vhs = [], [s_c], [vh_c]
    if per_task > 0:
        for i, delta in enumerate(deltas):
            u, s, vh = task_triplets(delta)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
            deltas[i] = None
    s_all = torch.cat(ss)
    left = u_c  # polar(U_c) = U_c: orthonormal columns, or zero ones below the floor
    if us:
        u_t = torch.cat(us, 1)
        # The floor is relative to the whole [U_c, U_1..U_T], whose largest singular value is
        # 1 when U_c has a column.
        whole = torch.ones((), dtype=u_t.dtype, device=u_t.device) if bool(s_c.any()) else None
        w_t, _ = inverse_sqrt_on_range(u_t.T @ u_t, (m, common + u_t.shape[1]), sigma_1=whole)
        left = torch.cat([u_c, u_t @ w_t], 1)
    vh = torch.cat(vhs, 0)
    w_v, _ = inverse_sqrt_on_range(vh @ vh.T, vh.shape)
    return finish(group, (left @ w_v.mul_(s_all.mean())) @ vh)


# ---------------------------------------------------------------- STAR

def spectral_truncate_and_rescale(matrix: torch.Tensor, eta: float) -> torch.Tensor:
    """STAR on one task vector: keep the fewest top singular values whose sum reaches eta% of
    the nuclear norm, and rescale them so that the nuclear norm is unchanged:

        k = min{k : sum_{i<=k} sigma_i >= (eta/100) sum_i sigma_i}
        STAR(tau) = sum_{i<=k} sigma_i * (||tau||_* / sum_{j<=k} sigma_j) u_i v_i^T
    """
    u, s, vh = singular_triplets(matrix)
    nuclear = s.sum()
    if nuclear == 0:
        return torch.zeros_like(u @ vh)
    keep = int(torch.searchsorted(torch.cumsum(s, 0), nuclear * (eta / 100)).item()) + 1
    keep = min(keep, s.numel())
    kept = s[:keep]
    return reconstruct(u[:, :keep], kept * (nuclear / kept.sum()), vh[:keep])


def star(group: TensorGroup) -> torch.Tensor:
    """STAR (Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging", NAACL 2025,
    https://arxiv.org/abs/2502.10339): theta_0 + lambda * (1/T) sum_t STAR(w_t tau_t).

    Follows the authors' ``merger/STAR.py`` (github.com/IBM/STAR) and its runner, which average
    the truncated task vectors with weights 1/T; their code has no lambda (it is 1) and applies
    STAR to LoRA update matrices, where we apply it to every decomposed full-rank tensor. Its
    optional ``known_rank`` randomized SVD is a speed-up for LoRA inputs and is not offered.
    """
    deltas = weighted_task_vectors(group)
    if not is_decomposed(group):
        return average_fallback(group, deltas)
    total = None
    for i, delta in enumerate(deltas):
        truncated = spectral_truncate_and_rescale(delta, group.params["eta"])
        total = truncated if total is None else total.add_(truncated)
        deltas[i] = None
    return finish(group, total.div_(len(deltas)))


# ---------------------------------------------------------------- CART

def cart_rank(r: int, rank_ratio: float) -> int:
    """The authors' rank: 0 at ratio 0, r at ratio 1, else max(1, int(ratio * r))."""
    if rank_ratio <= 0:
        return 0
    if rank_ratio >= 1:
        return r
    return max(1, int(rank_ratio * r))


def cart(group: TensorGroup) -> torch.Tensor:
    """CART, centered arithmetic with rank reduction (Choi et al., "Revisiting Weight Averaging
    for Model Merging", 2025, https://arxiv.org/abs/2412.12153):

        tau_avg = (1/T) sum_t w_t tau_t            (theta_avg = theta_0 + tau_avg)
        merged  = theta_avg + lambda * sum_t lowrank_k(w_t tau_t - tau_avg),  k = rank_ratio * r

    Follows the authors' code (github.com/JH-GEECS/CART, ``src/merging.py``, merge method
    "CART"): the sum over tasks, not a mean, and lambda (their ``prior``) default 2.0 with
    rank_ratio 0.12, their 8-task setting. Tensors that are not decomposed get theta_avg: the
    code adds lambda * sum_t (theta_t - theta_avg) there, which is zero.
    """
    deltas = weighted_task_vectors(group)
    average = mean_of(deltas)
    if not is_decomposed(group):
        return average.add_(group.base)
    k = cart_rank(min(group.base.shape), group.params["rank_ratio"])
    total = torch.zeros(group.base.shape, dtype=torch.float64, device=group.base.device)
    if k > 0:
        for i, delta in enumerate(deltas):
            total += reconstruct(*singular_triplets(delta.sub_(average), k))
            deltas[i] = None
    total.mul_(group.params["lambda"]).add_(average)
    return total.to(group.base.dtype).add_(group.base)


# ---------------------------------------------------------------- registration

def _lambda(default: float = 1.0) -> Param:
    return Param("lambda", float, default, doc="scale of the merged task vector")


def _register(name: str, fn, extra: tuple[Param, ...], reference: str, summary: str,
              lam: float = 1.0) -> None:
    register(MethodSpec(
        name=name, fn=fn,
        params=(weight_param(default=1.0), _lambda(lam)) + extra + (include_embeddings_param(),),
        base=BasePolicy.REQUIRED, min_models=1, reference=reference, summary=summary,
        # The fallback theta_0 + lambda * (1/T) sum_t w_t tau_t (CART: theta_avg) is entry-wise.
        row_separable=not_decomposed,
    ))


_register("tsv_m", tsv_m, (), "https://arxiv.org/abs/2412.00081",
          "top r/T singular triplets of each task vector, orthogonalized bases (TSV-M)")
_register("iso_c", iso_c, (), "https://arxiv.org/abs/2502.04959",
          "sum of task vectors with its spectrum flattened to the mean singular value")
_register("iso_cts", iso_cts,
          (Param("common_space_fraction", float, 0.8, low=0.0, high=1.0,
                 doc="fraction of the r directions taken from the common subspace of the sum"),),
          "https://arxiv.org/abs/2502.04959",
          "Iso-C on a common subspace plus task-specific directions")
_register("star", star,
          (Param("eta", float, 40.0, low=0.0, high=100.0, low_open=True,
                 doc="percentage of each task vector's nuclear norm kept by the truncation"),),
          "https://arxiv.org/abs/2502.10339",
          "truncate each task vector's spectrum to eta% of its nuclear norm, rescale, average")
_register("cart", cart,
          (Param("rank_ratio", float, 0.12, low=0.0, high=1.0,
                 doc="fraction of the r singular directions kept of each centered task vector"),),
          "https://arxiv.org/abs/2412.12153",
          "average plus the low-rank parts of the task vectors centered on it",
          lam=2.0)
