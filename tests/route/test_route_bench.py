"""route:<kind> and moe:<kind> rows in the benchmark table, on the test-size zoo."""

import json

import pytest

from mergesmith.errors import InputError
from mergesmith.zoo import bench as BN
from mergesmith.zoo.bench_moe import parameter_cost, parse_moe
from mergesmith.zoo.bench_route import oracle_owners, parse_routers


@pytest.mark.filterwarnings("ignore:.*nearly dependent")  # mergekit's hidden gates on barely trained experts
def test_bench_adds_routed_and_moe_rows_with_their_measures(zoo, zoo_cache, tmp_path):
    # multiple choice only, three items a task: the rows and their measures, not their values
    cfg = BN.BenchConfig(out=tmp_path, size="test", seeds=(0,), methods=("linear",), cache=zoo_cache, limit=3,
                         val_limit=2, generation=False, progress=False, routers=("centroid", "oracle"),
                         moe=("hidden",))
    BN.run_bench(cfg, log=lambda msg: None)
    seed = json.loads((tmp_path / "results.json").read_text())["seeds"][0]
    table = (tmp_path / "table.md").read_text()
    for row in ("route:centroid", "route:oracle", "moe:hidden"):
        assert f"| {row} |" in table
        assert set(seed["scores"][row]["mc"]) == set(seed["scores"]["base"]["mc"])  # every skill
        whole = seed["whole"][row]
        assert 0.0 <= whole["routing_accuracy"] <= 1.0 and whole["wall_x"] > 0
    assert "## Experts kept whole" in table and "| routing accuracy | params_x | active_x | wall_x |" in table
    oracle = seed["whole"]["route:oracle"]
    assert oracle["routing_accuracy"] == 1.0  # each trained skill's items go to its own expert
    for held, owner in oracle["oracle_heldout_owner"].items():  # and each held-out skill to one expert
        assert oracle["heldout_shares"][held] == {owner: 1.0}
    centroid = seed["whole"]["route:centroid"]
    assert set(centroid["heldout_shares"]) == set(seed["scores"]["base"]["mc"]) - set(centroid["routing_by_skill"])
    moe = seed["whole"]["moe:hidden"]
    assert moe["experts"] == len(centroid["routing_by_skill"]) and moe["top_k"] == 2
    assert moe["params_x"] > moe["active_params_x"] > 1.0  # eight MLPs stored, two run per token
    assert not (tmp_path / "work" / "routed" / "seed0" / "oracle").exists()  # evaluated, then removed
    assert not (tmp_path / "work" / "moe" / "seed0" / "hidden").exists()


def test_oracle_sends_a_heldout_skill_to_its_best_expert_on_validation():
    val = {"a": {"x": 0.5, "y": 0.7}, "b": {"x": 0.5, "y": 0.9}}
    assert oracle_owners(val, ("x", "y")) == {"x": "a", "y": "b"}  # a tie goes to the first expert


def test_active_parameters_count_top_k_of_the_experts(tmp_path):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "base").mkdir()
    (tmp_path / "moe").mkdir()
    save_file({"embed": torch.zeros(10, 4), "mlp": torch.zeros(6, 4)}, tmp_path / "base" / "model.safetensors")
    save_file({"embed": torch.zeros(10, 4), "gate": torch.zeros(4, 4),
               **{f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": torch.zeros(6, 4) for e in range(4)}},
              tmp_path / "moe" / "model.safetensors")
    cost = parameter_cost(tmp_path / "moe", tmp_path / "base", top_k=2)
    assert cost["experts"] == 4
    assert cost["params_x"] == pytest.approx((40 + 16 + 96) / 64)
    assert cost["active_params_x"] == pytest.approx((40 + 16 + 48) / 64)


def test_bench_refuses_unknown_and_repeated_kinds():
    assert parse_routers("centroid, oracle") == ("centroid", "oracle")
    assert parse_moe("hidden,trained+shared-ties") == ("hidden", "trained+shared-ties")
    with pytest.raises(InputError, match="vote"):
        parse_routers("vote")
    with pytest.raises(InputError, match="more than once"):
        parse_routers("oracle,oracle")
    with pytest.raises(InputError, match="choose from hidden, ridge, trained"):
        parse_moe("cheap")
