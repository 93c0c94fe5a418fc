"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, https://arxiv.org/abs/2503.08099).

A linear layer's task vector spans (approximately) the inputs of its task, so the
interference the merged update tau causes on task t's inputs can be measured with tau_t
itself. WUDI finds the merged task vector of each weight matrix by minimizing

    L(tau) = sum_t ||(tau - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

with Adam (betas 0.9, 0.999, eps 1e-8, no weight decay) from tau = sum_t tau_t, for
``iterations`` steps at ``learning_rate``; theta = theta_0 + tau. The gradient is formed in
closed form, dL/dtau = 2 sum_t (tau - tau_t) tau_t^T tau_t / ||tau_t||^2, as
2 (tau G - B) with G = sum_t tau_t^T tau_t / ||tau_t||^2 and B = sum_t tau_t G_t, or term by
term, whichever needs fewer multiplications per step (``interference_gradient``). The Adam update is the same
arithmetic as ``torch.optim.Adam``; the optimizer state lives on the inputs' device and
no autograd is used, so the result is deterministic.

Tensors that are not optimized (1-D, and the vocabulary tensors unless
``include_embeddings``) get the mean task vector, theta_0 + (1/T) sum_t tau_t, as
FusionBench's ``wudi_merging`` does. Defaults follow the authors' ViT script
(``vit/wudi_main.py``, github.com/nathanielyvo/WUDI-Merging) and FusionBench: 300 steps at
learning rate 1e-5 (their RoBERTa script uses 2e-5). ``weight`` scales tau_t before
anything else. A zero task vector contributes nothing to L (its term is 0/0 in the
reference code). See docs/methods/interference.md.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import (
    BasePolicy, MethodSpec, Param, TensorGroup, include_embeddings_param, is_decomposed, not_decomposed, register,
    weight_param,
)
from mergesmith.methods.drm import at_least_float32
from mergesmith.methods.subspace import sum_of, weighted_task_vectors

ITERATIONS = 300
LEARNING_RATE = 1e-5
BETAS = (0.9, 0.999)
EPS = 1e-8


def interference_gradient(deltas: list[torch.Tensor], sq_norms: list[float]):
    """A function tau -> dL/dtau for the task vectors ``deltas`` (each rows x cols, nonzero).

    Two ways to form 2 sum_t (tau - tau_t) tau_t^T tau_t / ||tau_t||^2, whichever takes fewer
    multiplications per step: with G = sum_t tau_t^T tau_t / ||tau_t||^2 (cols x cols) and
    B = sum_t tau_t G_t as 2 (tau G - B), 2 rows cols^2 per step; or term by term, 4 T rows^2
    cols. G wins unless cols >= 2 T rows (e.g. a key projection with few rows); for a
    down-projection (cols ~ 2.75 rows) it halves the work at the price of G, up to 2T times
    the matrix. G's path keeps only G and B, not the task vectors. With one task and more
    columns than rows it stays term by term: there tau = tau_1 gives a gradient of exactly 0
    (tau - tau_1 = 0), so one model comes back unchanged, which tau G - B only does up to rounding
    (as it does when G_1 and B_1 = tau_1 G_1 come from the same product, the cols <= rows case).
    """
    rows, cols = deltas[0].shape
    if cols <= rows or (len(deltas) > 1 and cols < 2 * len(deltas) * rows):
        gram = torch.zeros(cols, cols, dtype=deltas[0].dtype, device=deltas[0].device)
        target = torch.zeros_like(deltas[0])
        for delta, sq in zip(deltas, sq_norms):
            if cols <= rows:
                g_t = (delta.T @ delta).div_(sq)
                gram.add_(g_t)
                target.addmm_(delta, g_t)
                del g_t
            else:  # wide: tau_t G_t as (tau_t tau_t^T) tau_t, no second cols x cols matrix
                gram.addmm_(delta.T, delta, alpha=1 / sq)
                target.addmm_(delta @ delta.T, delta, alpha=1 / sq)
        return lambda tau: (tau @ gram).sub_(target).mul_(2)

    def term_by_term(tau: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(tau)
        for delta, sq in zip(deltas, sq_norms):
            grad.addmm_(((tau - delta) @ delta.T).div_(sq), delta)
        return grad.mul_(2)
    return term_by_term


def wudi_task_vector(deltas: list[torch.Tensor], iterations: int = ITERATIONS,
                     learning_rate: float = LEARNING_RATE) -> torch.Tensor:
    """argmin_tau sum_t ||(tau - tau_t) tau_t^T||^2 / ||tau_t||^2 by Adam from sum_t tau_t.

    Empties ``deltas`` once the loss no longer needs them, so that a caller that holds the
    task vectors only in that list has their memory back during the steps."""
    tau = torch.zeros_like(deltas[0])
    for d in deltas:
        tau.add_(d)
    sq_norms = [float(torch.linalg.vector_norm(d).square()) for d in deltas]
    live = [(d, sq) for d, sq in zip(deltas, sq_norms) if sq > 0]
    if not live or iterations == 0:
        return tau
    gradient = interference_gradient([d for d, _ in live], [sq for _, sq in live])
    deltas.clear()
    del live
    beta1, beta2 = BETAS
    exp_avg = torch.zeros_like(tau)
    exp_avg_sq = torch.zeros_like(tau)
    denom = torch.empty_like(tau)
    for step in range(1, iterations + 1):
        grad = gradient(tau)
        # Adam as torch.optim.Adam's single-tensor path computes it (denominator in a reused buffer).
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        del grad
        step_size = learning_rate / (1 - beta1 ** step)
        torch.sqrt(exp_avg_sq, out=denom).div_((1 - beta2 ** step) ** 0.5).add_(EPS)
        tau.addcdiv_(exp_avg, denom, value=-step_size)
    return tau


def wudi(group: TensorGroup) -> torch.Tensor:
    """theta_0 + WUDI(w_1 tau_1, ..., w_T tau_T) for matrices, the mean task vector otherwise.

    The task vectors are formed in the inputs' storage when the engine allows (no stacked copy)."""
    deltas = weighted_task_vectors(group)
    if not is_decomposed(group):
        # Summed in order and divided by T: the same rounding as FusionBench.
        return sum_of(deltas).div_(len(deltas)).add_(group.base)
    # Steps of lr = 1e-5 vanish in 16-bit floats: optimize in float32, round once at the end.
    dtype = deltas[0].dtype
    vectors = [at_least_float32(d) for d in deltas]
    del deltas  # the list is the last holder: wudi_task_vector lets them go when done with them
    merged = wudi_task_vector(vectors, group.params["iterations"], group.params["learning_rate"])
    return merged.to(dtype).add_(group.base)


register(MethodSpec(
    name="wudi", fn=wudi,
    params=(
        weight_param(default=1.0),
        Param("iterations", int, ITERATIONS, low=0, doc="Adam steps per weight matrix"),
        Param("learning_rate", float, LEARNING_RATE, low=0.0, low_open=True,
              doc="Adam learning rate"),
        include_embeddings_param(),
    ),
    base=BasePolicy.REQUIRED, min_models=1,
    # The mean task vector of the tensors it does not optimize is entry-wise: the vocabulary
    # tensors are merged in row blocks.
    row_separable=not_decomposed,
    # Adam's state (tau, m, v, the denominator, the gradient) and, for a wide matrix, the cols x cols
    # Gram: on the 1-layer 1.1B family of benchmarks/bench_subspace.py (three experts, float32 math)
    # the merge peaks at 1.22 GiB where the engine's allowance alone predicts 0.94 GiB with the
    # runtime; 2 tensors per input more predicts 1.29 GiB (1.5 would predict 1.2).
    workspace_per_input=2.0,
    reference="https://arxiv.org/abs/2503.08099",
    summary="per matrix, Adam on the task-vector-weighted interference loss",
))
