"""KnOTS and core-space merges against transcriptions of the authors' equations:
gstoica27/KnOTS (task_merger.SVDMerger.apply_svd and merge, masking_ops.ties_masking) and
apanariello4/core-space-merging (task_merger.get_core_matrices, merge with merge_space='core')."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergesmith.lora.merge import merge_lora
from tests.lora.lora_fixtures import make_adapter, write_recipe
from tests.tiny_models import make_model

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj")


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Three adapters of different ranks, one with rsLoRA; the scales folded into B for the references."""
    root = tmp_path_factory.mktemp("lora-spaces")
    base = make_model(root / "base", "llama", seed=0)
    adapters = [make_adapter(base, root / "a", seed=1),
                make_adapter(base, root / "b", seed=2, r=2, lora_alpha=16, use_rslora=True),
                make_adapter(base, root / "c", seed=3, r=3, lora_alpha=6)]
    scales = [8 / 4, 16 / 2 ** 0.5, 6 / 3]
    factors = []
    for adapter, scale in zip(adapters, scales):
        tensors = load_file(adapter / "adapter_model.safetensors")
        factors.append({m: (tensors[f"base_model.model.{m}.lora_A.weight"].double(),
                            scale * tensors[f"base_model.model.{m}.lora_B.weight"].double()) for m in MODULES})
    return adapters, factors


# ---- the authors' pieces, transcribed (masking_ops.py of both repositories)

def topk_values_mask(m: torch.Tensor, k_fraction: float, authors_extra: int = 1) -> torch.Tensor:
    """Per row, keep the entries at least as large in magnitude as the (d - int(d K))-th smallest:
    int(d K) + 1 of them in the authors' code. TIES (and our ``ties``) keeps int(d K); the tests
    pass ``authors_extra=0`` to compare the rest of the method (docs/lora.md names the difference)."""
    d = m.shape[1]
    kth = m.abs().kthvalue(d - int(d * k_fraction) + 1 - authors_extra, dim=1, keepdim=True).values
    return m.abs() >= kth


def resolve_sign(pruned: torch.Tensor) -> torch.Tensor:
    sign = torch.sign(pruned.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def ties(vectors: list[torch.Tensor], k_fraction: float, authors_extra: int = 1) -> torch.Tensor:
    """ties_masking, then masked_merge('mean') with weights [1]: the disjoint mean."""
    stacked = torch.stack([v.flatten() for v in vectors])
    pruned = stacked * topk_values_mask(stacked, k_fraction, authors_extra)
    sign = resolve_sign(pruned)
    kept = pruned * torch.where(sign[None] > 0, pruned > 0, pruned < 0)
    return (kept.sum(0) / (kept != 0).sum(0).clamp(min=1)).reshape(vectors[0].shape)


def knots_delta(pairs, merge) -> torch.Tensor:
    """SVDMerger.apply_svd: SVD of [dW_1 ... dW_n] (concat_across_output), S > 1e-5;
    task_sVs[i] = diag(S) V_i; the merged sV mapped back by U (reconstruct_merged_sd)."""
    stack = torch.cat([b @ a for a, b in pairs], dim=1)
    u, s, v = torch.linalg.svd(stack, full_matrices=False)
    u, v, s = u[:, s > 1e-5], v[s > 1e-5], s[s > 1e-5]
    coordinates = [torch.diag(s) @ block for block in torch.split(v, v.shape[1] // len(pairs), dim=1)]
    return u @ merge(coordinates)


def core_delta(pairs, merge) -> torch.Tensor:
    """get_core_matrices, then delta_W = U_B_ref @ M_merged @ Vh_A_ref."""
    a_stack = torch.cat([a for a, _ in pairs], dim=0)
    b_stack = torch.cat([b for _, b in pairs], dim=1)
    vh_ref = torch.linalg.svd(a_stack, full_matrices=False)[2]
    u_ref = torch.linalg.svd(b_stack, full_matrices=False)[0]
    cores = []
    for a, b in pairs:
        u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
        core = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)
        cores.append((u_ref.T @ u_b) @ core @ (vh_a @ vh_ref.T))
    return u_ref @ merge(cores) @ vh_ref


def merged_products(out) -> dict[str, torch.Tensor]:
    tensors = load_file(out / "adapter_model.safetensors")
    return {m: tensors[f"base_model.model.{m}.lora_B.weight"].double()
            @ tensors[f"base_model.model.{m}.lora_A.weight"].double() for m in MODULES}


@pytest.mark.parametrize("space, reference", [("knots", knots_delta), ("core", core_delta)])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_space_merge_equals_the_authors_equations(trio, tmp_path, space, reference, method):
    adapters, factors = trio
    parameters = {"space": space, **({"density": 0.5} if method == "ties" else {})}
    recipe = write_recipe(tmp_path / "r.yml", method, adapters, [{"weight": 1.0}] * 3, parameters=parameters)
    result = merge_lora(recipe, tmp_path / "out", progress=False)
    got = merged_products(result.out_dir)
    merge = (lambda xs: ties(xs, 0.5, authors_extra=0)) if method == "ties" else (lambda xs: sum(xs))
    for module in MODULES:
        expected = reference([f[module] for f in factors], merge)
        torch.testing.assert_close(got[module], expected, atol=1e-5, rtol=1e-4, msg=module)
        assert result.report[module]["relative_error"] < 1e-6  # kept whole: rank <= sum r_i


def test_linear_merges_agree_in_every_space(trio, tmp_path):
    """Task arithmetic is linear, so the space it merges in cannot matter: sum_i w_i dW_i."""
    adapters, factors = trio
    weights = [0.5, -1.0, 0.25]
    for space in ("full", "knots", "core"):
        recipe = write_recipe(tmp_path / f"{space}.yml", "task_arithmetic", adapters,
                              [{"weight": w} for w in weights], parameters={"space": space, "rank": 9})
        got = merged_products(merge_lora(recipe, tmp_path / space, progress=False).out_dir)
        for module in MODULES:
            expected = sum(w * b @ a for w, (a, b) in zip(weights, (f[module] for f in factors)))
            torch.testing.assert_close(got[module], expected, atol=1e-5, rtol=1e-4, msg=f"{space} {module}")


def test_the_authors_top_k_keeps_one_entry_more():
    """The difference the transcription sets aside above, shown: int(d K) + 1 entries, not int(d K)."""
    m = torch.arange(1.0, 11.0)[None]
    assert int(topk_values_mask(m, 0.5).sum()) == 6
    assert int(topk_values_mask(m, 0.5, authors_extra=0).sum()) == 5
