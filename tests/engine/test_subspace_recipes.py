"""The subspace merges through the whole engine: a recipe per method, the dry-run plan, and
parameter filters and layer gradients on lambda resolved per tensor."""

from __future__ import annotations

import pytest
import torch

import mergesmith
from mergesmith.errors import InputError
from tiny_models import load_state

METHODS = ["tsv_m", "iso_c", "iso_cts", "star", "cart"]


def recipe(name, base, fts, **params):
    return {"merge_method": name, "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, (1.0, 0.8, 1.2))],
            "parameters": params}


@pytest.mark.parametrize("name", METHODS)
def test_recipe_dry_run_filters_and_gradients(name, model_family, tmp_path):
    base, fts = model_family("llama", 3)
    # self_attn: lambda 0 in the first layer rising to 1 in the last; the rest 0.5.
    lam = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    r = recipe(name, base, fts, **{"lambda": lam})

    plan = mergesmith.merge(r, tmp_path / "dry", dry_run=True).plan
    assert not (tmp_path / "dry").exists()
    assert f"method:          {name}" in plan.describe(mergesmith.engine.MergeOptions(), full=False)

    mergesmith.merge(r, tmp_path / "graded", progress=False)
    mergesmith.merge(recipe(name, base, fts, **{"lambda": 1.0}), tmp_path / "one", progress=False)
    mergesmith.merge(recipe(name, base, fts, **{"lambda": 0.5}), tmp_path / "half", progress=False)
    graded, one, half, b = (load_state(p) for p in (tmp_path / "graded", tmp_path / "one", tmp_path / "half", base))

    first, last = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    if name == "cart":  # lambda scales only the low-rank part on top of the average
        mergesmith.merge(recipe(name, base, fts, **{"lambda": 0.0}), tmp_path / "zero", progress=False)
        assert torch.allclose(graded[first], load_state(tmp_path / "zero")[first], atol=1e-6)
    else:
        assert torch.allclose(graded[first], b[first], atol=1e-6)
    assert torch.allclose(graded[last], one[last], atol=1e-6)
    mlp = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(graded[mlp], half[mlp], atol=1e-6)
    assert not torch.allclose(graded[mlp], b[mlp], atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_include_embeddings_decomposes_the_vocabulary_tensors(name, model_family, tmp_path):
    base, fts = model_family("llama", 3)
    mergesmith.merge(recipe(name, base, fts), tmp_path / "plain", progress=False)
    mergesmith.merge(recipe(name, base, fts, include_embeddings=True), tmp_path / "incl", progress=False)
    plain, incl = load_state(tmp_path / "plain"), load_state(tmp_path / "incl")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.allclose(plain[key], incl[key], atol=1e-6), key
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(plain[key], incl[key])


@pytest.mark.parametrize("name,field,value", [("star", "eta", 0), ("iso_cts", "common_space_fraction", 1.5),
                                              ("cart", "rank_ratio", -0.1)])
def test_bad_parameters_are_rejected_up_front(name, field, value, model_family, tmp_path):
    base, fts = model_family("llama", 3)
    with pytest.raises(InputError, match=field):
        mergesmith.merge(recipe(name, base, fts, **{field: value}), tmp_path / "x", dry_run=True)


def test_a_base_model_is_required(model_family, tmp_path):
    base, fts = model_family("llama", 3)
    r = recipe("tsv_m", base, fts)
    del r["base_model"]
    with pytest.raises(InputError, match="base"):
        mergesmith.merge(r, tmp_path / "x", dry_run=True)


def test_dry_run_peak_counts_a_methods_measured_workspace(model_family):
    """drm and pcb declare workspace_per_input (measured); the predicted peak includes it."""
    from mergesmith.engine import MergeOptions, plan_merge

    base, experts = model_family()
    options = MergeOptions(prefetch_bytes=0)
    peaks = {}
    for method in ("ties", "drm"):
        params = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
        recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(e), "parameters": dict(params)} for e in experts]}
        plan = plan_merge(recipe, options)
        peaks[method] = plan.predicted_peak_bytes(options)
        biggest = max(plan.tensors, key=lambda t: t.input_bytes(plan))
        for m in plan.models:
            m.checkpoint.close()
    from mergesmith.methods import get_method

    extra = get_method("drm").workspace_per_input * biggest.input_bytes(plan)
    assert peaks["drm"] - peaks["ties"] == pytest.approx(extra, rel=0.01)
