"""LoRA rows of the benchmark (``--lora``) on the test-size zoo: the pool, adapter-space and folded
merges, extracted adapters. Grids cut to one or two points and one rank, to stay fast."""

import json

import pytest

from mergesmith.errors import InputError
from mergesmith.zoo import bench as BN
from mergesmith.zoo import bench_lora as BLo
from mergesmith.zoo.build import build_lora_pool


def test_the_pool_has_an_adapter_per_trained_skill_and_reuses_the_manifests(zoo):
    assert set(zoo.lora) < set(zoo.trained)  # build_zoo makes only the size's few LoRA experts
    pool = build_lora_pool(zoo, progress=False)
    assert list(pool) == list(zoo.trained)
    assert all((p / "adapter_model.safetensors").exists() for p in pool.values())
    assert all(pool[s] == zoo.lora[s] for s in zoo.lora)


def test_bench_adds_the_lora_rows(zoo, zoo_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(BN, "TA_LAMBDAS", [0.5, 1.0])  # the concatenation's grid: its weight
    monkeypatch.setitem(BN.GRIDS, "ties", [{"density": 0.5, "lambda": 1.0}])
    monkeypatch.setattr(BLo, "EXTRACT_RANKS", (2,))
    cfg = BN.BenchConfig(out=tmp_path, size="test", seeds=(0,), methods=("ties",), cache=zoo_cache, limit=4,
                         val_limit=3, generation=False, progress=False,
                         extra_rows=(BLo.LoraRows(("concat", "fold_ties", "extract")),))
    BN.run_bench(cfg, log=lambda msg: None)
    result = json.loads((tmp_path / "results.json").read_text())["seeds"][0]
    scores = result["scores"]
    expected = {"lora-merge:concat", "lora-fold:ties", *(f"extract:r2:{s}" for s in zoo.trained)}
    assert expected <= set(scores)
    assert all(set(scores[row]["mc"]) == set(scores["base"]["mc"]) for row in expected)  # every skill
    assert len(result["validation"]["lora-merge:concat"]) == 2  # chosen on validation
    assert result["chosen"]["lora-fold:ties"] == {"density": 0.5, "lambda": 1.0}
    table = (tmp_path / "table.md").read_text()
    assert "| lora-merge:concat |" in table and "| lora-fold:ties |" in table and "| extract r2 |" in table
    assert not (tmp_path / "work" / "extra-rows" / "seed0" / "lora-merge-concat").exists()  # evaluated, removed


def test_lora_rows_are_checked_by_name():
    assert BLo.parse_lora_rows("all") == BLo.LORA_ROWS
    assert BLo.parse_lora_rows("concat, extract") == ("concat", "extract")
    with pytest.raises(InputError, match="knots, cat not a LoRA row"):
        BLo.parse_lora_rows("knots,concat,cat")
