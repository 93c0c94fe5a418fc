"""Whole-checkpoint parity with mergekit 0.1.5: same recipe, same tiny checkpoints, every tensor.

Deterministic methods must agree to a max relative difference below 1e-5 in float32.
Stochastic methods (DARE, DELLA) are compared statistically in tests/methods; here we
check they are reproducible from random_seed and structurally sound.
"""

from __future__ import annotations

import pytest
import torch

import mergesmith
from tiny_models import ARCHS, load_state
from mergekit_ref import run_mergekit

# A gradient and a filter in most recipes, so resolution is exercised with every method.
GRAD = [0.2, 0.8, 0.5]
FILTERED = [{"filter": "self_attn", "value": [0.3, 0.9]}, {"filter": "mlp", "value": 0.6}, {"value": 0.5}]


def recipe(method: str, base, fts) -> dict:
    b, (a, c, d) = str(base), [str(p) for p in fts]
    weighted = lambda ws, **extra: [{"model": m, "parameters": {"weight": w, **extra}} for m, w in zip((a, c, d), ws)]
    recipes = {
        "linear": {"models": weighted([1.0, GRAD, 0.5])},
        "task_arithmetic": {"base_model": b, "models": weighted([0.5, GRAD, FILTERED]),
                            "parameters": {"lambda": 0.9}},
        "ties": {"base_model": b, "models": weighted([1.0, 0.7, GRAD], density=FILTERED)},
        "breadcrumbs": {"base_model": b, "models": weighted([1.0, 0.6, 0.8], density=0.8, gamma=[0.05, 0.1])},
        "breadcrumbs_ties": {"base_model": b, "models": weighted([1.0, 0.6, 0.8], density=0.7, gamma=0.05)},
        "slerp": {"base_model": b, "models": [{"model": b}, {"model": a}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "nuslerp": {"models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": c, "parameters": {"weight": 0.7}}]},
        "multislerp": {"base_model": b, "models": weighted([0.3, 0.5, 0.2])},
        "karcher": {"models": [{"model": a}, {"model": c}, {"model": d}]},
        "model_stock": {"base_model": b, "models": [{"model": a}, {"model": c}, {"model": d}]},
        "sce": {"base_model": b, "models": [{"model": a}, {"model": c}, {"model": d}],
                "parameters": {"select_topk": 0.5}},
        "nearswap": {"base_model": b, "models": [{"model": b}, {"model": a}], "parameters": {"t": 0.02}},
        "arcee_fusion": {"base_model": b, "models": [{"model": b}, {"model": a}]},
        "ram": {"base_model": b, "models": [{"model": a}, {"model": c}, {"model": d}],
                "parameters": {"epsilon": 0.02}},
        "ramplus_tl": {"base_model": b, "models": [{"model": a}, {"model": c}, {"model": d}],
                       "parameters": {"epsilon": 0.02, "r": [0.1, 0.3], "alpha": 0.4}},
        "passthrough": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                   {"sources": [{"model": c, "layer_range": [1, 3]}],
                                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        "ties_slices": {"base_model": b, "merge_method": "ties", "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2],
                                                               "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": c, "layer_range": [1, 3], "parameters": {"weight": GRAD, "density": 0.7}}]},
            {"sources": [{"model": b, "layer_range": [2, 3]}, {"model": a, "layer_range": [2, 3],
                                                               "parameters": {"weight": 0.5, "density": 0.9}},
                         {"model": c, "layer_range": [2, 3], "parameters": {"weight": 1.0, "density": 0.4}}],
             "parameters": {"normalize": False}}]},
    }
    r = recipes[method]
    r.setdefault("merge_method", method)
    r["dtype"] = "float32"
    return r


DETERMINISTIC = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "nuslerp",
                 "multislerp", "karcher", "model_stock", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
                 "ties_slices"]


def compare(ours: dict, theirs: dict) -> float:
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for k, ref in theirs.items():
        assert ours[k].shape == ref.shape, k
        assert ours[k].dtype == ref.dtype, k
        scale = ref.abs().max().clamp_min(1e-12)
        worst = max(worst, ((ours[k] - ref).abs().max() / scale).item())
    return worst


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_mergekit(method, arch, model_family, tmp_path):
    base, fts = model_family(arch, 3)
    r = recipe(method, base, fts)
    mergesmith.merge(r, tmp_path / "ours", progress=False)
    try:
        run_mergekit(r, tmp_path / "theirs")
        their_config_bug = False
    except Exception as err:
        # mergekit 0.1.5 changes num_hidden_layers for slices but keeps the input's layer_types, which
        # transformers rejects when saving the config (Qwen2 has layer_types). Its tensors are already
        # written by then, so they are still compared; our config must be the valid one.
        if "layer_types" not in str(err):
            raise
        their_config_bug = True
    assert compare(load_state(tmp_path / "ours"), load_state(tmp_path / "theirs")) < 1e-5
    from transformers import AutoConfig
    ours_cfg = AutoConfig.from_pretrained(tmp_path / "ours")
    if their_config_bug:
        assert arch == "qwen2" and method == "passthrough"
        assert len(ours_cfg.layer_types) == ours_cfg.num_hidden_layers == 4
    else:
        assert ours_cfg.num_hidden_layers == AutoConfig.from_pretrained(tmp_path / "theirs").num_hidden_layers


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_stochastic_methods_reproducible_from_seed(method, model_family, tmp_path):
    base, fts = model_family("llama", 3)
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]
    r = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32", "random_seed": 7}
    mergesmith.merge(r, tmp_path / "a", progress=False)
    mergesmith.merge(r, tmp_path / "b", progress=False)
    mergesmith.merge({**r, "random_seed": 8}, tmp_path / "c", progress=False)
    a, b, c = (load_state(tmp_path / x) for x in "abc")
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name])
    # Output differs from base only where some input's task vector survived pruning.
    base_t = load_state(base)[name]
    assert 0.2 < (a[name] != base_t).float().mean().item() < 1.0
