"""merge-lora: adapters in, adapter out; the folded result against PEFT and hand formulas."""

from __future__ import annotations

import pytest
import torch

from mergesmith.errors import InputError
from mergesmith.lora.merge import merge_lora, plan_lora_merge
from tests.lora.lora_fixtures import (
    adapter_config,
    base_state,
    load_folded,
    make_adapter,
    peft_deltas,
    write_recipe,
)
from tests.tiny_models import make_model


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A base and three adapters: different ranks, alpha, rsLoRA, rank/alpha patterns, partly
    different target modules, one adapting the token embeddings."""
    root = tmp_path_factory.mktemp("lora-pool")
    base = make_model(root / "base", "llama", seed=0)
    adapters = [
        make_adapter(base, root / "a", seed=1),
        make_adapter(base, root / "b", seed=2, r=2, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "embed_tokens"]),
        make_adapter(base, root / "c", seed=3, r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"],
                     rank_pattern={"down_proj": 3}, alpha_pattern={"q_proj": 12}),
    ]
    deltas = [peft_deltas(base, a) for a in adapters]
    return base, adapters, deltas


def weighted_sum(deltas: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for delta, w in zip(deltas, weights):
        for name, d in delta.items():
            total[name] = total.get(name, 0) + w * d
    return total


def folded_delta(base, adapter) -> dict[str, torch.Tensor]:
    before = base_state(base)
    after = load_folded(base, adapter)
    return {k: after[k] - before[k] for k in before}


def test_concat_is_exact_and_loads_in_peft(pool, tmp_path):
    base, adapters, deltas = pool
    weights = [1.0, -0.5, 0.7]
    recipe = write_recipe(tmp_path / "r.yml", "concat", adapters, [{"weight": w} for w in weights])
    result = merge_lora(recipe, tmp_path / "out", progress=False)
    expected = weighted_sum(deltas, weights)
    got = folded_delta(base, result.out_dir)
    for name, d in got.items():
        torch.testing.assert_close(d, expected.get(name, torch.zeros_like(d)), atol=1e-5, rtol=1e-5)
    config = adapter_config(result.out_dir)
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"]
    # rank sum r_i per module, and every rank that is not r is in both patterns
    assert result.report["model.layers.0.self_attn.q_proj"]["rank"] == 4 + 2 + 6
    assert result.report["model.layers.0.mlp.down_proj"]["rank"] == 4 + 3
    assert result.report["model.embed_tokens"]["rank"] == 2
    for module, r in ((m, rep["rank"]) for m, rep in result.report.items()):
        assert config["rank_pattern"].get(module, config["r"]) == r
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == r
    assert all(rep["relative_error"] == 0 for rep in result.report.values())
    assert not list(tmp_path.glob(".out.partial-*"))


def test_one_adapter_in_is_the_same_adapter_out(pool, tmp_path):
    """Each scale applied exactly once: an rsLoRA adapter with weight 1 folds as itself."""
    base, adapters, deltas = pool
    recipe = write_recipe(tmp_path / "r.yml", "concat", [adapters[1]])
    out = merge_lora(recipe, tmp_path / "out", progress=False).out_dir
    got = folded_delta(base, out)
    for name, d in got.items():
        torch.testing.assert_close(d, deltas[1].get(name, torch.zeros_like(d)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_full_delta_at_full_rank_equals_the_weighted_sum(pool, tmp_path, method):
    base, adapters, deltas = pool
    weights = [0.6, 0.3, 0.1]
    recipe = write_recipe(tmp_path / "r.yml", method, adapters, [{"weight": w} for w in weights],
                          parameters={"rank": 16, **({"normalize": False} if method == "linear" else {})})
    result = merge_lora(recipe, tmp_path / "out", progress=False)
    expected = weighted_sum(deltas, weights)
    for name, d in folded_delta(base, result.out_dir).items():
        torch.testing.assert_close(d, expected.get(name, torch.zeros_like(d)), atol=2e-5, rtol=1e-4)
    assert max(r["relative_error"] for r in result.report.values()) < 1e-5


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("method", ["concat", "task_arithmetic"])
def test_truncation_is_the_best_rank_k_and_its_error_is_reported(pool, tmp_path, method):
    base, adapters, deltas = pool
    recipe = write_recipe(tmp_path / "r.yml", method, adapters, [{"weight": 1.0}] * 3, parameters={"rank": 3})
    result = merge_lora(recipe, tmp_path / "out", progress=False)
    expected = weighted_sum(deltas, [1.0] * 3)
    got = folded_delta(base, result.out_dir)
    name = "model.layers.1.self_attn.q_proj.weight"
    reference = best_rank_k(expected[name], 3)
    torch.testing.assert_close(got[name].double(), reference, atol=2e-5, rtol=1e-4)
    error = float((expected[name].double() - reference).norm() / expected[name].double().norm())
    assert result.report[name.removesuffix(".weight")]["relative_error"] == pytest.approx(error, rel=1e-4)
    assert result.report[name.removesuffix(".weight")]["rank"] == 3


def test_rank_by_energy_keeps_the_fewest_singular_values(pool, tmp_path):
    base, adapters, deltas = pool
    recipe = write_recipe(tmp_path / "r.yml", "concat", adapters, parameters={"energy": 0.9})
    result = merge_lora(recipe, tmp_path / "out", progress=False)
    expected = weighted_sum(deltas, [1.0] * 3)
    for module, rep in result.report.items():
        s = torch.linalg.svdvals(expected[f"{module}.weight"].double())
        share = (s.square().cumsum(0) / s.square().sum()).tolist()
        k = rep["rank"]
        assert share[k - 1] >= 0.9 - 1e-9 and (k == 1 or share[k - 2] < 0.9)
        assert rep["relative_error"] == pytest.approx((1 - share[k - 1]) ** 0.5, abs=1e-6)


def synthetic_adapter(path, seed: int, shape=(96, 128), rank: int = 4):
    """A PEFT adapter folder written by hand: one wide module, alpha = 2 r."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    module = "base_model.model.model.layers.0.mlp.up_proj"
    path.mkdir()
    save_file({f"{module}.lora_A.weight": torch.randn(rank, shape[1], generator=g),
               f"{module}.lora_B.weight": torch.randn(shape[0], rank, generator=g)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                          "target_modules": ["up_proj"]}))
    return path


def test_full_delta_on_a_wide_module_uses_a_randomized_svd_and_measures_its_error(tmp_path):
    from safetensors.torch import load_file

    from mergesmith.methods import TensorGroup, get_method

    adapters = [synthetic_adapter(tmp_path / f"a{i}", seed=i) for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yml", "ties", adapters, [{"weight": 1.0, "density": 0.5}] * 3)
    result = merge_lora(recipe, tmp_path / "out", progress=False)
    report = result.report["model.layers.0.mlp.up_proj"]
    assert report["svd"] == "randomized" and report["rank"] == 4
    # The TIES delta by hand from the registry, and the best rank-4 approximation's error.
    deltas = []
    for adapter in adapters:
        t = load_file(adapter / "adapter_model.safetensors")
        deltas.append(2.0 * t[next(k for k in t if "lora_B" in k)] @ t[next(k for k in t if "lora_A" in k)])
    ties = get_method("ties")
    group = TensorGroup("x", [torch.zeros(96, 128), *deltas], {"lambda": 1.0, "normalize": True, "rescale": False,
                        "int8_mask": False}, [{}] + [{"weight": 1.0, "density": 0.5}] * 3, 0)
    merged = ties.fn(group).double()
    s = torch.linalg.svdvals(merged)
    optimum = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    written = out[next(k for k in out if "lora_B" in k)].double() @ out[next(k for k in out if "lora_A" in k)].double()
    measured = float((merged - written).norm() / merged.norm())
    assert report["relative_error"] == pytest.approx(measured, rel=1e-4)
    assert optimum - 1e-6 <= measured <= 1.02 * optimum


def test_parameters_take_gradients_across_layers_and_filters(pool, tmp_path):
    """weight [1, 0] over three layers is 1, 0.5, 0; a filter on q_proj overrides it."""
    base, adapters, deltas = pool
    weight = [{"filter": "q_proj", "value": 2.0}, {"value": [1.0, 0.0]}]
    recipe = write_recipe(tmp_path / "r.yml", "concat", [adapters[0]], [{"weight": weight}])
    got = folded_delta(base, merge_lora(recipe, tmp_path / "out", progress=False).out_dir)
    for layer, w in enumerate((1.0, 0.5, 0.0)):
        name = f"model.layers.{layer}.self_attn.v_proj.weight"
        torch.testing.assert_close(got[name], w * deltas[0][name], atol=1e-6, rtol=1e-5)
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(got[name], 2.0 * deltas[0][name], atol=1e-6, rtol=1e-5)


def test_a_merged_adapter_folds_in_a_merge_recipe_as_model_plus_adapter(pool, tmp_path):
    """Our own model+adapter reference reads what merge-lora writes (rank_pattern, scale 1)."""
    from mergesmith import merge
    from tests.tiny_models import load_state

    base, adapters, deltas = pool
    recipe = write_recipe(tmp_path / "r.yml", "concat", adapters, [{"weight": 0.5}] * 3)
    adapter = merge_lora(recipe, tmp_path / "adapter", progress=False).out_dir
    fold = {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    merge(fold, tmp_path / "folded")
    got, before = load_state(tmp_path / "folded"), base_state(base)
    expected = weighted_sum(deltas, [0.5] * 3)
    for name, d in expected.items():
        torch.testing.assert_close(got[name] - before[name], d, atol=1e-5, rtol=1e-5, msg=name)
