"""route:<kind> rows in the benchmark table, on the test-size zoo."""

import json

import pytest

from mergesmith.errors import InputError
from mergesmith.zoo import bench as BN
from mergesmith.zoo.bench_route import parse_routers


def test_bench_adds_a_routed_row_over_every_skill(zoo, zoo_cache, tmp_path):
    cfg = BN.BenchConfig(out=tmp_path, size="test", seeds=(0,), methods=("linear",), cache=zoo_cache, limit=6,
                         val_limit=4, generation=False, progress=False, routers=("centroid",))
    BN.run_bench(cfg, log=lambda msg: None)
    seed = json.loads((tmp_path / "results.json").read_text())["seeds"][0]["scores"]
    assert "| route:centroid |" in (tmp_path / "table.md").read_text()
    assert set(seed["route:centroid"]["mc"]) == set(seed["base"]["mc"])  # every skill, trained and held-out
    assert not (tmp_path / "work" / "routed" / "seed0" / "centroid").exists()  # evaluated, then removed


def test_bench_refuses_the_oracle_and_unknown_kinds_with_the_reason():
    assert parse_routers("centroid, classifier") == ("centroid", "classifier")
    with pytest.raises(InputError, match="no expert for a held-out skill"):
        parse_routers("oracle")
    with pytest.raises(InputError, match="vote"):
        parse_routers("vote")
