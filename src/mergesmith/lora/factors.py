"""Low-rank algebra on LoRA factors: pure functions on tensors, no I/O.

A LoRA module holds factors A (r x n) and B (m x r) and a scale s; its delta is
``dW = s * B @ A`` (for an embedding, PEFT stores the transpose: ``W + (s * B @ A)^T``;
everything here works in the adapter's own orientation, m x n = B @ A).
"""

from __future__ import annotations

import math

import torch


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scale: s = alpha / r, or s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def concat_factors(factors: list[tuple[torch.Tensor, torch.Tensor]],
                   coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: A = [c_1 A_1; ...; c_n A_n], B = [B_1 ... B_n], so that

        B @ A = sum_i c_i B_i A_i      (rank sum_i r_i; with c_i = w_i s_i, the merged delta)

    Each c_i is split as sqrt|c_i| on both factors (its sign on A), keeping A and B balanced.
    ``factors`` holds (A_i, B_i) pairs.
    """
    a_parts, b_parts = [], []
    for (a, b), c in zip(factors, coefficients):
        root = math.sqrt(abs(c))
        a_parts.append(a * math.copysign(root, c))
        b_parts.append(b * root)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U S Vh of an m x n matrix, computed from its smaller side: a QR of the tall
    orientation (m x k, k = min(m, n)), then the SVD of the k x k triangle R."""
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = thin_svd(matrix.T)
        return vh.T, s, u.T
    q, r = torch.linalg.qr(matrix)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return q @ u, s, vh


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of B @ A (m x r times r x n) without forming the m x n product:

        B = Q_B R_B,  A^T = Q_A R_A,  R_B R_A^T = u S vh   =>   B A = (Q_B u) S (vh Q_A^T)

    Costs O((m + n) r^2 + r^3) instead of O(m n min(m, n)). Returns U (m x k), S (k), Vh (k x n)
    with k = min(r, m, n).
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


OVERSAMPLE = 16  # extra directions a randomized SVD tracks beyond the rank it keeps


def randomized_svd(matrix: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE, iterations: int = 4,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank + oversample`` singular triplets of an m x n matrix by subspace iteration
    (Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Algorithm 4.4):

        Q = orth(M Omega),  then ``iterations`` times Q = orth(M orth(M^T Q));
        Q^T M = u S Vh,  U = Q u

    O(m n (rank + oversample) (2 iterations + 2)) instead of O(m n min(m, n)). Since S Vh = U^T M
    exactly, ||M - U_k S_k Vh_k||_F^2 = ||M||_F^2 - sum_{i<=k} S_i^2 holds for what is returned, so
    the truncation error is that of the best approximation within the subspace Q found.
    """
    width = min(rank + oversample, *matrix.shape)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(matrix.shape[1], width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega)[0]
    for _ in range(iterations):
        q = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ q)[0])[0]
    u, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ u, s, vh


def rank_for_energy(singular_values: torch.Tensor, energy: float, total: float | None = None) -> int:
    """The smallest k with sum_{i<=k} S_i^2 >= energy * total (at least 1), where total is
    sum_i S_i^2 over the whole spectrum (give ||dW||_F^2 when only the leading S_i are known)."""
    squares = singular_values.double().square()
    total = float(squares.sum()) if total is None else total
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # A tolerance of a few ulps, so that energy = 1 keeps exactly the nonzero spectrum's length
    # and not one more or less through rounding of the cumulative sum.
    reached = (kept >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


def choose_rank(singular_values: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                threshold: float | None = None, total: float | None = None) -> int:
    """The rank kept: the smallest that every given limit allows, at least 1.

    ``rank``: at most this many; ``energy``: the fewest that keep this share of ``total``
    (default sum S_i^2); ``threshold``: only singular values above it (mergekit's ``--sv-epsilon``).
    """
    k = len(singular_values)
    if rank is not None:
        k = min(k, rank)
    if energy is not None:
        k = min(k, rank_for_energy(singular_values, energy, total))
    if threshold is not None and threshold > 0:
        k = min(k, int((singular_values > threshold).sum()))
    return max(k, 1)


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-k approximation, from the whole spectrum
    (Eckart-Young):

        ||dW - dW_k||_F / ||dW||_F = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)      (0 for dW = 0)
    """
    squares = singular_values.double().square()
    total = float(squares.sum())
    return math.sqrt(float(squares[rank:].sum()) / total) if total > 0 else 0.0


def residual_error(matrix: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """||M - B A||_F / ||M||_F, computed (where only the leading singular values are known;
    ||M||^2 - sum S_i^2 would lose every digit below about 1e-3 to cancellation)."""
    norm = float(matrix.norm())
    return float(torch.addmm(matrix, b, a, alpha=-1).norm()) / norm if norm > 0 else 0.0


def split_singular_values(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the rank-k truncation, sqrt(S) on each side:

        A = sqrt(S_k) Vh_k,   B = U_k sqrt(S_k),   B @ A = U_k S_k Vh_k
    """
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def knots_coordinates(factors: list[tuple[torch.Tensor, torch.Tensor] | None],
                      tolerance: float = 1e-6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS", arXiv:2410.19735):
    the adapters' deltas side by side share one left basis,

        [dW_1 ... dW_n] = U S [V_1^T ... V_n^T],   C_i = S V_i^T  (k x n),   dW_i = U C_i,

    so the coordinates C_i are aligned and can be merged entry-wise. ``factors[i]`` is (A_i, B_i)
    with the scale in B_i (dW_i = B_i A_i), or None where the adapter lacks the module (C_i = 0).
    The SVD comes from the factors, [B_1 ... B_n] times the block diagonal of the A_i, never from
    the m x n*in matrix; directions with S_j <= tolerance * S_1 are dropped (the authors keep
    S_j > 1e-5 absolute). Returns U (m x k) and every C_i.
    """
    present = [f for f in factors if f is not None]
    width = present[0][0].shape[1]
    u, s, vh = svd_of_product(torch.cat([b for _, b in present], dim=1),
                              torch.block_diag(*[a for a, _ in present]))
    keep = s > tolerance * s[0] if len(s) else s.bool()
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = iter((s[:, None] * vh).split(width, dim=1))
    return u, [next(blocks) if f is not None else torch.zeros(len(s), width) for f in factors]


def core_space(factors: list[tuple[torch.Tensor, torch.Tensor] | None]
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Core space (Panariello et al. 2025, "Accurate and Efficient Low-Rank Model Merging in Core
    Space", NeurIPS, arXiv:2509.17786): reference bases from the stacked factors,

        [B_1 ... B_n] = U_B S_B ...,   [A_1; ...; A_n] = ... S_A Vh_A,
        M_i = U_B^T B_i A_i Vh_A^T        (at most sum r_i square; dW_i = U_B M_i Vh_A exactly),

    so the small cores M_i can be merged entry-wise and mapped back, with no full-size SVD.
    ``factors`` as for ``knots_coordinates`` (None: M_i = 0). Returns U_B, every M_i, Vh_A.
    """
    present = [f for f in factors if f is not None]
    u_ref = thin_svd(torch.cat([b for _, b in present], dim=1))[0]
    vh_ref = thin_svd(torch.cat([a for a, _ in present], dim=0))[2]
    cores = [(u_ref.T @ f[1]) @ (f[0] @ vh_ref.T) if f is not None
             else torch.zeros(u_ref.shape[1], vh_ref.shape[0]) for f in factors]
    return u_ref, cores, vh_ref
