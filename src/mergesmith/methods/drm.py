"""DRM, Decom-Renorm-Merge (Chaichana et al., "Decom-Renorm-Merge: Model Merging on the
Right Space Improves Multitasking", https://arxiv.org/abs/2505.23117).

The task vectors of one weight matrix are stacked and decomposed together, so that all of
them are written in one shared basis; each task's coordinates are renormalized, pruned,
sign-resolved and averaged there, then mapped back. DRM-V (``stack: vertical``) stacks the
n x m task vectors into a (T n) x m matrix:

    [tau_1; ...; tau_T] = U S V^T          (thin SVD; keep s_i > 0.01 s_max)
    U = [U_1; ...; U_T]                    (U_t: n x r, the task's block of U)
    Ubar_t = U_t / ||U_t||_col,  s_t = s * ||U_t||_col   (renormalize each column)
    keep the entries of [Ubar_1..Ubar_T] with |x| >= the k-th smallest, k = N - round(N density)
    C_t = Ubar_t diag(s_t)                 (pruned)
    elect sign per entry by total mass, drop disagreeing entries, disjoint mean over t -> C
    tau = C V^T

DRM-H (``stack: horizontal``) stacks them side by side, n x (T m), and renormalizes the
rows of the blocks of V^T; it is DRM-V applied to the transposed task vectors.

Tensors that are not decomposed (1-D, and the vocabulary tensors unless
``include_embeddings``) take the authors' "other parameters" path: sign election by mass
and disjoint mean of the task vectors.

The specification is the authors' ``drm/_decom_renorm_merge.py``
(github.com/yophis/decom-renorm-merge, ``left_drm``/``right_drm``/``drm_merging``), not
their command-line script. Where we differ: a zero-norm block column is left at zero
instead of dividing by zero; ``weight`` scales tau_t before the decomposition (the
authors' coefficients multiply after sign election); ``density`` 1 runs the whole
algorithm without pruning (the authors' drop rate 0 skips to a plain disjoint mean of the
raw task vectors); no magnitude trim of the other parameters (their default rate is 0).
See docs/methods/interference.md.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import (
    BasePolicy,
    MethodSpec,
    Param,
    TensorGroup,
    include_embeddings_param,
    is_decomposed,
    register,
    weight_param,
)
from mergesmith.methods.sparsify import kth_smallest
from mergesmith.methods.task_arithmetic import stacked_task_vectors

# Singular values below this fraction of the largest are dropped as null space (authors' code).
RANK_RTOL = 1e-2


def weighted_task_vectors(group: TensorGroup) -> torch.Tensor:
    """w_t tau_t stacked along a new first axis, shape (T, *base.shape)."""
    models, model_params = group.others()
    deltas = stacked_task_vectors(group.base, models)
    for delta, mp in zip(deltas, model_params):
        if mp["weight"] != 1:
            delta.mul_(mp["weight"])
    return deltas


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a 16-bit float type, otherwise ``x`` itself."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def resolve_sign_conflicts(stacked: torch.Tensor) -> torch.Tensor:
    """Zero the entries whose sign disagrees with the sign of the sum over the first axis.

    Where that sum is exactly 0 the elected sign is the sign of the sum of all elected signs
    in the tensor (the authors' "mass" resolution). In place; returns ``stacked``.
    """
    elected = stacked.sum(dim=0).sign_()
    elected.masked_fill_(elected == 0, elected.sum().sign())
    # One task at a time: the mask and the signs are temporaries of one task vector's size,
    # not of the whole stack (the vocabulary tensors' fallback is where this peaks).
    for task in stacked:
        task.masked_fill_(task.sign() != elected, 0.0)
    return stacked


def disjoint_mean(stacked: torch.Tensor) -> torch.Tensor:
    """Mean over the first axis counting only nonzero entries (0 where all are zero)."""
    # int32 and counted one task at a time: count_nonzero(dim=0) would hold an int64 count
    # and a bool mask of the whole stack. The counts, small integers, divide exactly as before.
    count = torch.zeros(stacked.shape[1:], dtype=torch.int32, device=stacked.device)
    for task in stacked:
        count += task != 0
    return stacked.sum(dim=0).div_(count.clamp_(min=1))


def keep_largest_entries(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zero |x| below the k-th smallest magnitude, k = N - round(N density), in place.

    As the authors' ``zero_out_non_topk``: entries equal to the k-th smallest are kept, so
    round(N density) + 1 entries survive when magnitudes are distinct.
    """
    n = x.numel()
    k = n - round(n * density)
    if k < 1:
        return x
    magnitudes = x.abs()
    threshold = kth_smallest(magnitudes.reshape(-1), k)
    return x.mul_(magnitudes >= threshold)


def merge_in_shared_basis(blocks: torch.Tensor, s: torch.Tensor, density: float) -> torch.Tensor:
    """The merged coordinates from each task's block (T, k, r) of the shared singular vectors.

    Renormalize each block's columns (the norm moves into that task's singular values),
    prune, elect signs and take the disjoint mean; returns k x r.
    """
    norms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)  # (T, 1, r)
    # A task with no component along a shared direction has a zero block column: it stays
    # zero (and so does its singular value) rather than becoming 0/0.
    blocks = blocks.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
    coords = keep_largest_entries(blocks, density).mul_(s * norms)
    return disjoint_mean(resolve_sign_conflicts(coords))


def drm_merge_matrix(deltas: torch.Tensor, density: float, stack: str) -> torch.Tensor:
    """The merged n x m task vector from task vectors of shape (T, n, m).

    vertical:   [tau_1; ...; tau_T] = U S V^T, blocks of U (n x r), result C V^T
    horizontal: [tau_1 ... tau_T] = U S V^T, blocks of V (m x r), result U C^T
    """
    t, n, m = deltas.shape
    if stack == "vertical":
        u, s, vh = torch.linalg.svd(deltas.reshape(t * n, m), full_matrices=False)
    else:
        u, s, vh = torch.linalg.svd(deltas.permute(1, 0, 2).reshape(n, t * m), full_matrices=False)
    rank = int((s > s.max().item() * RANK_RTOL).sum())
    if rank == 0:
        return deltas.new_zeros(n, m)
    s = s[:rank]
    if stack == "vertical":
        blocks = u[:, :rank].reshape(t, n, rank)
        return merge_in_shared_basis(blocks, s, density) @ vh[:rank]
    blocks = vh[:rank].reshape(rank, t, m).permute(1, 2, 0)  # (T, m, r)
    return u[:, :rank] @ merge_in_shared_basis(blocks, s, density).T


def drm(group: TensorGroup) -> torch.Tensor:
    """theta_0 + DRM(w_1 tau_1, ..., w_T tau_T); see the module docstring."""
    deltas = weighted_task_vectors(group)
    if is_decomposed(group):
        # The SVD has no half-precision kernels; decompose in float32 and round once at the end.
        merged = drm_merge_matrix(at_least_float32(deltas), group.params["density"],
                                  group.params["stack"]).to(deltas.dtype)
    else:
        merged = disjoint_mean(resolve_sign_conflicts(deltas))
    return merged.add_(group.base)


register(MethodSpec(
    name="drm", fn=drm,
    params=(
        weight_param(default=1.0),
        Param("stack", str, "vertical", choices=("vertical", "horizontal"),
              doc="stack task vectors vertically (DRM-V) or horizontally (DRM-H) before the SVD"),
        Param("density", float, 0.2, low=0.0, high=1.0, low_open=True,
              doc="fraction of renormalized singular-vector entries kept (1 - drop rate)"),
        include_embeddings_param(),
    ),
    base=BasePolicy.REQUIRED, min_models=1,
    # The vocabulary tensors' fallback (32000 x 2048, three experts, float32 math; the 1.1B family of
    # benchmarks/bench_subspace.py cut to its vocabulary tensors and one small layer): peak 4.3 GiB
    # against 2.65 GiB for ties, about 1.6 tensors per input more; 1.5 more than the engine's
    # allowance predicts 4.6 GiB with the runtime.
    workspace_per_input=1.5,
    reference="https://arxiv.org/abs/2505.23117",
    summary="joint SVD of stacked task vectors, renormalize, prune, elect sign, disjoint mean",
))
