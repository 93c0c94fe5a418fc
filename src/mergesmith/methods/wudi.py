"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, https://arxiv.org/abs/2503.08099).

A linear layer's task vector spans (approximately) the inputs of its task, so the
interference the merged update tau causes on task t's inputs can be measured with tau_t
itself. WUDI finds the merged task vector of each weight matrix by minimizing

    L(tau) = sum_t ||(tau - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

with Adam (betas 0.9, 0.999, eps 1e-8, no weight decay) from tau = sum_t tau_t, for
``iterations`` steps at ``learning_rate``; theta = theta_0 + tau. The gradient is formed in
closed form, dL/dtau = 2 sum_t (tau - tau_t) tau_t^T tau_t / ||tau_t||^2, as
2 (tau G - B) with G = sum_t tau_t^T tau_t / ||tau_t||^2 and B = sum_t tau_t G_t when the
matrix has no more columns than rows (G is then no larger than the matrix), and term by
term otherwise, so the extra memory stays within one matrix. The Adam update is the same
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
    BasePolicy, MethodSpec, Param, TensorGroup, include_embeddings_param, is_decomposed, register, weight_param,
)
from mergesmith.methods.drm import at_least_float32, weighted_task_vectors

ITERATIONS = 300
LEARNING_RATE = 1e-5
BETAS = (0.9, 0.999)
EPS = 1e-8


def interference_gradient(deltas: list[torch.Tensor], sq_norms: list[float]):
    """A function tau -> dL/dtau for the task vectors ``deltas`` (each n x m, nonzero)."""
    rows, cols = deltas[0].shape
    if cols <= rows:
        gram = torch.zeros(cols, cols, dtype=deltas[0].dtype, device=deltas[0].device)
        target = torch.zeros_like(deltas[0])
        for delta, sq in zip(deltas, sq_norms):
            g_t = (delta.T @ delta).div_(sq)
            gram.add_(g_t)
            target.addmm_(delta, g_t)
        return lambda tau: (tau @ gram).sub_(target).mul_(2)

    def term_by_term(tau: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(tau)
        for delta, sq in zip(deltas, sq_norms):
            grad.addmm_(((tau - delta) @ delta.T).div_(sq), delta)
        return grad.mul_(2)
    return term_by_term


def wudi_task_vector(deltas: list[torch.Tensor], iterations: int = ITERATIONS,
                     learning_rate: float = LEARNING_RATE) -> torch.Tensor:
    """argmin_tau sum_t ||(tau - tau_t) tau_t^T||^2 / ||tau_t||^2 by Adam from sum_t tau_t."""
    tau = torch.stack(deltas).sum(dim=0)
    sq_norms = [float(torch.linalg.vector_norm(d).square()) for d in deltas]
    live = [(d, sq) for d, sq in zip(deltas, sq_norms) if sq > 0]
    if not live or iterations == 0:
        return tau
    gradient = interference_gradient([d for d, _ in live], [sq for _, sq in live])
    beta1, beta2 = BETAS
    exp_avg = torch.zeros_like(tau)
    exp_avg_sq = torch.zeros_like(tau)
    for step in range(1, iterations + 1):
        grad = gradient(tau)
        # Adam as torch.optim.Adam's single-tensor path computes it.
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = learning_rate / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(EPS)
        tau.addcdiv_(exp_avg, denom, value=-step_size)
    return tau


def wudi(group: TensorGroup) -> torch.Tensor:
    """theta_0 + WUDI(w_1 tau_1, ..., w_T tau_T) for matrices, the mean task vector otherwise."""
    deltas = weighted_task_vectors(group)
    if not is_decomposed(group):
        # sum / T rather than mean: the same rounding as FusionBench.
        return deltas.sum(dim=0).div_(deltas.shape[0]).add_(group.base)
    # Steps of lr = 1e-5 vanish in 16-bit floats: optimize in float32, round once at the end.
    merged = wudi_task_vector(list(at_least_float32(deltas)), group.params["iterations"],
                              group.params["learning_rate"])
    return merged.to(deltas.dtype).add_(group.base)


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
    reference="https://arxiv.org/abs/2503.08099",
    summary="per matrix, Adam on the task-vector-weighted interference loss",
))
