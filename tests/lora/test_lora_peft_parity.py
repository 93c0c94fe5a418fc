"""merge-lora against PEFT 0.22.0's add_weighted_adapter (test-only), where PEFT's math is right,
and against hand formulas where it is not (docs/lora.md, "PEFT differences")."""

from __future__ import annotations

import warnings

import pytest
import torch

from mergesmith.lora.merge import merge_lora
from tests.lora.lora_fixtures import base_state, make_adapter, peft_deltas, write_recipe
from tests.tiny_models import make_model

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two rank-4 adapters over one base, the second with rsLoRA and another alpha."""
    root = tmp_path_factory.mktemp("lora-pair")
    base = make_model(root / "base", "llama", seed=0)
    adapters = [make_adapter(base, root / "a", seed=1),
                make_adapter(base, root / "b", seed=2, use_rslora=True, lora_alpha=16)]
    return base, adapters, [peft_deltas(base, a) for a in adapters]


def peft_weighted(base, adapters, weights, combination_type, **options) -> dict[str, torch.Tensor]:
    """dW of every weight after PEFT's add_weighted_adapter, folded by PEFT itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="x0")
        for i, adapter in enumerate(adapters[1:], 1):
            peft_model.load_adapter(adapter, adapter_name=f"x{i}")
        peft_model.add_weighted_adapter([f"x{i}" for i in range(len(adapters))], weights, "merged",
                                        combination_type=combination_type, **options)
        peft_model.set_adapter("merged")
        folded = peft_model.merge_and_unload(adapter_names=["merged"]).state_dict()
    before = base_state(base)
    return {k: folded[k] - before[k] for k in before}


def ours(tmp_path, base, adapters, method, weights, **extra) -> dict[str, torch.Tensor]:
    from tests.lora.lora_fixtures import load_folded

    recipe = write_recipe(tmp_path / "r.yml", method, adapters, [{"weight": w} for w in weights], **extra)
    out = merge_lora(recipe, tmp_path / "out", progress=False).out_dir
    before, after = base_state(base), load_folded(base, out)
    return {k: after[k] - before[k] for k in before}


def assert_same(got: dict, expected: dict, atol=2e-5):
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=1e-4, msg=name)


def test_concat_equals_peft_cat(pair, tmp_path):
    base, adapters, _ = pair
    weights = [0.8, -0.4]
    assert_same(ours(tmp_path, base, adapters, "concat", weights), peft_weighted(base, adapters, weights, "cat"))


def test_full_delta_svd_equals_peft_svd(pair, tmp_path):
    """PEFT 0.22.0 scales its SVD types once (the double scaling was fixed there), so no correction
    is needed: its ``svd`` at rank k is our ``task_arithmetic`` truncated to rank k."""
    base, adapters, _ = pair
    weights = [1.0, 0.5]
    expected = peft_weighted(base, adapters, weights, "svd", svd_rank=3)
    got = ours(tmp_path, base, adapters, "task_arithmetic", weights, parameters={"rank": 3})
    assert_same(got, expected)


def test_full_delta_ties_equals_peft_ties_svd(pair, tmp_path):
    """With unit weights PEFT's TIES (prune, then weight) and ours (weight, then prune; weighted
    disjoint mean) coincide, and both keep the best rank-8 approximation. (PEFT fails with an
    svd_rank above a module's smaller side, here v_proj's 8; ours caps the rank per module.)"""
    base, adapters, _ = pair
    expected = peft_weighted(base, adapters, [1.0, 1.0], "ties_svd", density=0.5, svd_rank=8)
    recipe_params = {"rank": 8, "density": 0.5}
    got = ours(tmp_path, base, adapters, "ties", [1.0, 1.0], parameters=recipe_params)
    assert_same(got, expected)


def test_peft_linear_has_cross_terms_and_ours_does_not(pair, tmp_path):
    """PEFT's ``linear`` merges A and B apart: A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i,
    so B A carries the cross terms sqrt(w_i s_i w_j s_j) B_i A_j. Ours is sum_i w_i s_i B_i A_i."""
    from safetensors.torch import load_file

    base, adapters, deltas = pair
    weights = [0.5, 0.5]
    peft = peft_weighted(base, adapters, weights, "linear")
    scales = [8 / 4, 16 / 2]  # alpha / r, and alpha / sqrt(r) for the rsLoRA adapter
    module = "base_model.model." + Q.removesuffix(".weight")
    factors = [load_file(a / "adapter_model.safetensors") for a in adapters]
    roots = [(w * s) ** 0.5 for w, s in zip(weights, scales)]
    a = sum(r * f[f"{module}.lora_A.weight"] for r, f in zip(roots, factors))
    b = sum(r * f[f"{module}.lora_B.weight"] for r, f in zip(roots, factors))
    torch.testing.assert_close(peft[Q], b @ a, atol=2e-5, rtol=1e-4)
    exact = sum(w * d[Q] for w, d in zip(weights, deltas))
    assert (peft[Q] - exact).norm() > 0.1 * exact.norm()  # the cross terms are no rounding error
    got = ours(tmp_path, base, adapters, "linear", weights, parameters={"rank": 8, "normalize": False})
    torch.testing.assert_close(got[Q], exact, atol=2e-5, rtol=1e-4)
