"""``mergesmith bench --study scaling`` on the test-size zoo."""

import csv
import json

import pytest

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.zoo import skills as S
from mergesmith.zoo import study as ST


def test_draws_are_seeded_distinct_subsets():
    a = ST.draws(S.TRAINED, 2, 3, seed=0)
    assert a == ST.draws(S.TRAINED, 2, 3, seed=0) and len(set(a)) == 3
    assert all(len(d) == 2 and set(d) <= set(S.TRAINED) for d in a)
    assert ST.draws(S.TRAINED, 8, 3, seed=0) == [S.TRAINED]


@pytest.fixture(scope="module")
def study_out(zoo, zoo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    code = main(["bench", "--study", "scaling", "--sizes", "test", "--expert-counts", "2,8", "--subsets", "2",
                 "--methods", "linear,task_arithmetic", "--limit", "6", "--val-limit", "4",
                 "--cache", str(zoo_cache), "--out", str(out)])
    assert code == 0
    return out


def test_study_writes_csv_plots_and_summary(study_out, zoo):
    for name in ("scaling.csv", "heldin.png", "heldout.png", "study.md", "results.json"):
        assert (study_out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((study_out / "scaling.csv").open()))
    # k=2: two draws, k=8: one, times two methods
    assert len(rows) == (2 + 1) * 2
    assert {(r["k"], r["method"]) for r in rows} == {(k, m) for k in ("2", "8") for m in ("linear", "task_arithmetic")}
    for r in rows:
        gain = float(r["avg_heldout"]) - float(r["base_heldout"])
        assert float(r["heldout_gain"]) == pytest.approx(gain, abs=2e-4)
        assert len(r["experts"].split("+")) == int(r["k"])
    text = (study_out / "study.md").read_text()
    assert "held-in k=2" in text and "held-out gain k=8" in text


def test_normalized_heldin_is_accuracy_over_the_experts(study_out):
    """Recompute one row's normalized held-in accuracy from the cached scores in results.json's
    inputs: the merge's accuracy per merged skill over that skill's expert's."""
    from mergesmith.zoo import bench as BN

    rows = json.loads((study_out / "results.json").read_text())["rows"]
    evals = {}
    for path in (study_out / "work").rglob("evals/*.json"):
        record = json.loads(path.read_text())
        evals[record["key"]] = record["value"]
    row = next(r for r in rows if r["k"] == 2 and r["method"] == "linear")
    skills = row["experts"].split("+")
    expert_scores = {k: v for k, v in evals.items() if "/experts/" in k.split("|")[0]}
    own = {}
    for key, value in expert_scores.items():
        skill = key.split("|")[0].rstrip("/").split("/")[-1]
        own[skill] = value[skill]
    merged = [v for k, v in evals.items() if '"merge_method": "linear"' in k and all(s in k for s in skills)
              and k.count('"model"') == 2 and "|test|" in k]
    assert len(merged) == 1
    want = BN.mean(merged[0][s] / own[s] for s in skills)
    assert row["normalized_heldin"] == pytest.approx(want, abs=1e-4)


def test_bad_study_arguments_are_reported_together(tmp_path):
    cfg = ST.StudyConfig(out=tmp_path / "o", sizes=("huge",), counts=(1, 9), methods=("nope",), subsets=0)
    with pytest.raises(InputError) as err:
        ST.run_study(cfg)
    text = str(err.value)
    for part in ("huge", "--expert-counts: 1", "--expert-counts: 9", "nope", "--subsets"):
        assert part in text, part
