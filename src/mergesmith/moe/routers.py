"""Routers beyond mergekit's: ``arrow`` (data-free) and ``ridge`` (closed-form, from the router's
real input). Both write one row per routed expert; a Qwen2-MoE shared expert's gate row is zero,
so sigmoid(0) = 1/2 weighs it the same for every token.

The router of layer l reads x = w_l ⊙ n, the post-attention-norm input of the MLP (w_l the
norm's weight, n of unit RMS), not the residual stream that mergekit's ``hidden`` modes read.

**arrow** (after Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
LoRAs"): D = [G_e − G_0; U_e − U_0] (the expert's gate and up projections minus the base's, 2I x H);
v = the top right singular vector of D (the top eigenvector of DᵀD), the input direction the
fine-tune changed most. Its sign is not in D: of ±v, we keep the one at which the expert's MLP
differs more from the base's, ‖f_e(s·v) − f_0(s·v)‖ with s = ‖w_l‖ (the typical norm of x). Its
scale: over isotropic inputs of unit RMS the logit g·x has standard deviation ‖g ⊙ w_l‖, so
g = v / ‖v ⊙ w_l‖ gives logits of unit spread, neither one-hot nor flat. An expert equal to the
base at a layer gets a zero row there.

**ridge**: each expert's prompts run through the base with that expert's MLPs in every layer (the
path the MoE takes when it routes them to it), and the MLP inputs x of every real token are kept.
Per layer, G minimizes Σ_e (1/N_e) Σ_{x of e} ‖G x − m·onehot(e)‖² + λ‖G‖², each expert's N_e
tokens weighted equally: Gᵀ = (A + λI)⁻¹ B with A = Σ_e X_eᵀX_e / N_e and B[:, e] = m·X_eᵀ1 / N_e.
λ = 10⁻³ · tr(A) / H (relative, so it does not depend on the scale of x). m = ln 99 ≈ 4.6: a
token fit exactly gives its expert 99% of the weight against an expert at logit 0. Negative
prompts are not used.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

RIDGE_MARGIN = math.log(99)
RIDGE_LAMBDA = 1e-3
MLP_INPUT = "model.layers.{layer}.mlp.{proj}_proj.weight"
NORM = "model.layers.{layer}.post_attention_layernorm.weight"

Read = Callable[[str, str], torch.Tensor]  # (model ref, tensor name) -> float32 tensor


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """down · (act(gate · x) ⊙ up · x), for rows of x."""
    return (act(x @ gate.T) * (x @ up.T)) @ down.T


def top_input_direction(delta: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of ``delta`` (rows x H) as the top eigenvector of its Gram."""
    gram = delta.T.double() @ delta.double()
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -1].float()


def arrow_row(base: dict, expert: dict, norm_weight: torch.Tensor, act) -> torch.Tensor:
    """One router row from an expert's and the base's {gate, up, down} of one layer (float32)."""
    delta = torch.cat([expert["gate"] - base["gate"], expert["up"] - base["up"]])
    if not bool(delta.any()):
        return torch.zeros(delta.shape[1])
    v = top_input_direction(delta)
    probe = norm_weight.norm() * torch.stack([v, -v])
    change = (gated_mlp(probe, **expert, act=act) - gated_mlp(probe, **base, act=act)).norm(dim=-1)
    if change[1] > change[0]:
        v = -v
    return v / (v * norm_weight).norm().clamp(min=1e-12)


def arrow_gates(read: Read, base_ref: str, expert_refs: list[str], layers: int, act,
                progress: bool = False) -> torch.Tensor:
    """(layers, experts, hidden): one layer of the base and one expert's MLP in memory at a time."""
    from tqdm.auto import tqdm

    rows = []
    for layer in tqdm(range(layers), desc="arrow routers", disable=not progress):
        def mlp(ref: str) -> dict:
            return {p: read(ref, MLP_INPUT.format(layer=layer, proj=p)) for p in ("gate", "up", "down")}
        base, w = mlp(base_ref), read(base_ref, NORM.format(layer=layer))
        rows.append(torch.stack([arrow_row(base, mlp(ref), w, act) for ref in expert_refs]))
    return torch.stack(rows)


def ridge_router(grams: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, margin: float = RIDGE_MARGIN,
                 relative_lambda: float = RIDGE_LAMBDA) -> torch.Tensor:
    """G (experts x H) from per-expert Grams X_eᵀX_e (E, H, H), sums X_eᵀ1 (E, H) and token counts (E)."""
    weights = 1.0 / counts.double().clamp(min=1)
    a = (grams.double() * weights[:, None, None]).sum(0)
    b = (sums.double() * weights[:, None]).T * margin
    lam = relative_lambda * a.diagonal().sum() / a.shape[0]
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, b).T.float()


def mlp_inputs(lm, prompts: list[str], tokenize) -> list[torch.Tensor]:
    """Per layer, the MLP inputs (post-attention norm) of every real token of ``prompts``: (tokens, H)."""
    from mergesmith.evaluate.scoring import left_padded

    layers = lm.model.model.layers
    captured: list[Optional[torch.Tensor]] = [None] * len(layers)
    ids, mask, positions = left_padded(lm, tokenize(lm.tokenizer, prompts))
    real = mask.bool().reshape(-1)

    def keep(index):
        def hook(module, args):
            captured[index] = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()[real]
        return hook

    handles = [layer.mlp.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                     position_ids=positions.to(lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def ridge_gates(read: Read, base_path, expert_refs: list[str], prompts: list[list[str]], layers: int,
                device: str, tokenize, progress: bool = False, dtype: torch.dtype = torch.float32,
                batch_size: int = 8) -> torch.Tensor:
    """(layers, experts, hidden): the base loaded once (in ``dtype``), each expert's MLPs swapped in turn;
    the Grams in float64."""
    from tqdm.auto import tqdm

    from mergesmith.evaluate.model import load_model

    lm = load_model(str(base_path), device=device, dtype=dtype)
    params = dict(lm.model.named_parameters())
    hidden = lm.model.config.hidden_size
    stats = []
    for ref, expert_prompts in tqdm(list(zip(expert_refs, prompts)), desc="ridge prompts", disable=not progress):
        with torch.no_grad():
            for layer in range(layers):
                for p in ("gate", "up", "down"):
                    name = MLP_INPUT.format(layer=layer, proj=p)
                    params[name].copy_(read(ref, name))
        per_layer = [(torch.zeros(hidden, hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64), 0)
                     for _ in range(layers)]
        for start in range(0, len(expert_prompts), batch_size):  # Grams add up over batches
            xs = mlp_inputs(lm, expert_prompts[start:start + batch_size], tokenize)
            per_layer = [(gram + x.T.double() @ x.double(), total + x.double().sum(0), count + x.shape[0])
                         for (gram, total, count), x in zip(per_layer, xs)]
        stats.append(per_layer)
    del lm, params
    rows = []
    for layer in range(layers):
        grams, sums, counts = zip(*(s[layer] for s in stats))
        rows.append(ridge_router(torch.stack(grams), torch.stack(sums), torch.tensor(counts)))
    return torch.stack(rows)
