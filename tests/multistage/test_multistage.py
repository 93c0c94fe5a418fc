"""Multi-stage recipes: the final model is the stages run by hand, bit for bit; stages are cached
by the key of their recipe and inputs, so an edit or a changed input reruns what depends on it;
every problem of every stage is one InputError before anything runs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mergesmith import merge
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.multistage import plan_multi, read_stages, run_multi
from mergesmith.paths import OutputLock
from tests.engine.test_lora_refs import make_adapter
from tests.tiny_models import load_state, make_model

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multistage-pool")
    base = make_model(root / "base", "llama", seed=0, layers=2)
    models = {"base": base}
    for i in (1, 2, 3):
        models[f"ft{i}"] = make_model(root / f"ft{i}", "llama", seed=i, base=base, layers=2)
    models["adapter"] = make_adapter(base, root / "adapter", seed=5)
    return models


def stages_yaml(pool: dict[str, Path], weight: float = 0.3, density: float = 0.6) -> list[dict]:
    """Three stages: a TIES merge, a linear merge of it (with an adapter folded in) and a third
    model, and a final SLERP of that and the base."""
    p = {k: str(v) for k, v in pool.items()}
    return [
        {"name": "ties12", "merge_method": "ties", "base_model": p["base"],
         "models": [{"model": p["ft1"], "parameters": {"weight": 1.0, "density": density}},
                    {"model": p["ft2"], "parameters": {"weight": 1.0, "density": density}}],
         "parameters": {"normalize": True}, "dtype": "float32"},
        {"name": "lin", "merge_method": "linear",
         "models": [{"model": "ties12+" + p["adapter"], "parameters": {"weight": 1 - weight}},
                    {"model": p["ft3"], "parameters": {"weight": weight}}], "dtype": "float32"},
        {"merge_method": "slerp", "base_model": p["base"],
         "models": [{"model": p["base"]}, {"model": "lin"}], "parameters": {"t": 0.4}, "dtype": "float32"},
    ]


def write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def by_hand(docs: list[dict], root: Path) -> dict[str, Path]:
    """Each stage merged with mergesmith.merge, its name replaced by the folder it was written to."""
    folders: dict[str, Path] = {}
    for doc in docs:
        doc = yaml.safe_load(yaml.safe_dump(doc))
        name = doc.pop("name", None) or "final"
        for entry in doc["models"]:
            model, plus, adapter = entry["model"].partition("+")
            if model in folders:
                entry["model"] = str(folders[model]) + plus + adapter
        out = root / name
        merge(doc, out, **QUIET)
        folders[name] = out
    return folders


def assert_same(a: Path, b: Path) -> None:
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_final_model_is_the_stages_run_by_hand_bit_for_bit(pool, tmp_path):
    docs = stages_yaml(pool)
    recipe = write(tmp_path / "multi.yml", docs)
    result = run_multi(recipe, tmp_path / "out", options=None, keep_intermediates=True)
    assert result.ran == ["ties12", "lin", ""]
    hand = by_hand(docs, tmp_path / "hand")
    assert_same(tmp_path / "out", hand["final"])
    # The kept intermediates are the by-hand stages too.
    for sp in result.plan.stages[:-1]:
        assert_same(sp.out_dir, hand[sp.stage.name])
    # And the merge really changed something at every stage (the check above could not pass vacuously).
    assert not torch.equal(load_state(hand["ties12"])["model.layers.0.mlp.up_proj.weight"],
                           load_state(pool["base"])["model.layers.0.mlp.up_proj.weight"])


def test_intermediates_are_removed_unless_kept(pool, tmp_path):
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    result = run_multi(recipe, tmp_path / "out")
    assert result.ran == ["ties12", "lin", ""]
    assert len(result.removed) == 2 and not any(p.exists() for p in result.removed)
    assert not (tmp_path / "out.stages").exists()  # the default folder, emptied, is gone too
    assert (tmp_path / "out" / "config.json").is_file()


def test_an_edit_or_a_changed_input_reruns_that_stage_and_every_later_one(pool, tmp_path):
    inter = tmp_path / "cache"
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))

    def run(out: str) -> list[str]:
        r = run_multi(recipe, tmp_path / out, intermediate_dir=inter, keep_intermediates=True,
                      options=None)
        assert sorted(r.ran + r.reused) == ["", "lin", "ties12"]
        return r.ran

    assert run("o1") == ["ties12", "lin", ""]
    assert run("o2") == [""]  # nothing changed: both intermediates reused
    assert_same(tmp_path / "o1", tmp_path / "o2")

    write(recipe, stages_yaml(pool, weight=0.5))  # the second stage edited
    assert run("o3") == ["lin", ""]
    write(recipe, stages_yaml(pool, weight=0.5, density=0.7))  # the first stage edited
    assert run("o4") == ["ties12", "lin", ""]
    assert run("o5") == [""]

    # A changed input (ft3 re-saved, as a new fine-tune would be) reruns the stage reading it.
    ft3 = pool["ft3"]
    st = os.stat(ft3 / "model.safetensors")
    try:
        os.utime(ft3 / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        assert run("o6") == ["lin", ""]
    finally:
        os.utime(ft3 / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    # A stage folder that merely exists under the stage's name (mergekit-multi's test) is not trusted.
    assert not (inter / "ties12").exists() and len(list(inter.glob("ties12-*"))) == 2


def test_dry_run_prints_the_whole_plan_and_writes_nothing(pool, tmp_path, capsys):
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    inter = tmp_path / "cache"
    assert main(["multi", str(recipe), str(tmp_path / "out"), "-I", str(inter), "--dry-run"]) == 0
    text = capsys.readouterr().out
    plan = plan_multi(recipe, tmp_path / "out", intermediate_dir=inter)
    lines = text.splitlines()
    order = [i for i, line in enumerate(lines) if line[:2] in ("1.", "2.", "3.")]
    assert [lines[i].split(":")[0] for i in order] == ["1. stage 'ties12' (document 1)",
                                                      "2. stage 'lin' (document 2)",
                                                      "3. the final stage (document 3)"]
    for sp in plan.stages:
        assert sp.key[:16] in text
    assert "to run, writes" in text and "cached at" not in text
    assert f"reads stage 'ties12' (key {plan.stages[0].key[:16]})" in text
    assert "checked: tensor by tensor" in text  # the first stage, whose inputs all exist
    assert not inter.exists() and not (tmp_path / "out").exists()

    run_multi(recipe, tmp_path / "out", intermediate_dir=inter, keep_intermediates=True)
    assert main(["multi", str(recipe), str(tmp_path / "out2"), "-I", str(inter), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("cached at") == 2


def test_every_problem_of_every_stage_at_once_before_anything_runs(pool, tmp_path):
    p = {k: str(v) for k, v in pool.items()}
    docs = [
        {"name": "a", "merge_method": "linear", "models": [{"model": p["ft1"], "parameters": {"weight": 1}},
                                                           {"model": "b", "parameters": {"weight": 1}}]},
        {"name": "b", "merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                           {"model": p["ft2"], "parameters": {"weight": 1}}]},
        {"name": "c", "merge_method": "ties", "base_model": p["base"],
         "models": [{"model": p["ft1"], "parameters": {"weight": 1, "density": 1.4}}]},
        {"name": "c", "merge_method": "linear", "models": [{"model": "c", "parameters": {"weight": 1}}]},
        {"name": "d", "merge_method": "linear", "models": [{"model": "e", "parameters": {"weight": 1}},
                                                           {"model": p["ft3"], "parameters": {"weight": 1}}]},
        {"name": "e", "merge_method": "linear", "models": [{"model": p["ft3"], "parameters": {"weight": 1}}]},
        {"merge_method": "linear", "models": [{"model": "dd", "parameters": {"weight": 1}},
                                              {"model": p["base"] + "+c", "parameters": {"weight": 1}}]},
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]},
    ]
    recipe = write(tmp_path / "multi.yml", docs)
    with pytest.raises(InputError) as err:
        run_multi(recipe, tmp_path / "out")
    text = str(err.value)
    where = str(recipe)
    assert f"{where}: documents 7, 8 have no name:" in text
    assert f"{where}: stage 'c' (document 4): name 'c' is already the name of document 3" in text
    assert "cycle (a -> b -> a)" in text
    assert f"{where}: stage 'd' (document 5): refers to stage 'e' (document 6), which does not come before it" in text
    assert "'dd' is neither a stage (did you mean stage 'd'?) nor a model folder" in text
    assert "'c' is a stage, which makes a full model, not a LoRA adapter" in text
    # The recipes are checked in the same round: stage 'c' (document 3) has a density out of range.
    assert f"{where}: stage 'c' (document 3): models[0].parameters.density = 1.4" in text
    # A bad reference is reported once, not again as a missing folder.
    assert "no such model folder" not in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stages").exists()

    # With the structure right, each stage's recipe problems come together, each naming its stage and field.
    docs = stages_yaml(pool)
    docs[0]["models"][0]["parameters"]["density"] = 1.4
    docs[1]["models"][1]["model"] = str(tmp_path / "missing")
    docs[2]["parameters"]["t"] = "x"
    recipe = write(tmp_path / "multi.yml", docs)
    with pytest.raises(InputError) as err:
        run_multi(recipe, tmp_path / "out")
    text = str(err.value)
    assert f"{where}: stage 'ties12' (document 1): models[0].parameters.density = 1.4" in text
    assert f"{where}: stage 'lin' (document 2): {tmp_path / 'missing'}: no such model folder" in text
    assert f"{where}: the final stage (document 3): parameters.t = 'x'" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stages").exists()


def test_an_unused_stage_is_named_and_not_run(pool, tmp_path):
    docs = stages_yaml(pool)
    docs.insert(2, {"name": "spare", "merge_method": "linear",
                    "models": [{"model": str(pool["ft1"]), "parameters": {"weight": 1}}]})
    recipe = write(tmp_path / "multi.yml", docs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_multi(recipe, tmp_path / "out")
    assert any("stage 'spare' (document 3): is not read by the final stage" in str(w.message) for w in caught)
    assert result.ran == ["ties12", "lin", ""] and [s.name for s in result.plan.unused] == ["spare"]


def test_a_second_run_on_the_same_intermediates_stops_at_once(pool, tmp_path):
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    inter = tmp_path / "cache"
    inter.mkdir()
    with OutputLock(inter):
        with pytest.raises(InputError, match="another mergesmith run is writing this output"):
            run_multi(recipe, tmp_path / "out", intermediate_dir=inter)
    assert not (tmp_path / "out").exists() and not any(inter.iterdir())


def test_existing_output_and_output_inside_the_intermediates_are_refused_up_front(pool, tmp_path):
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists; choose another output directory or pass --overwrite"):
        run_multi(recipe, tmp_path / "out")
    with pytest.raises(InputError, match="the output path lies inside the input the intermediate folder"):
        run_multi(recipe, tmp_path / "cache" / "out", intermediate_dir=tmp_path / "cache")
    assert not (tmp_path / "out.stages").exists() and not (tmp_path / "cache").exists()


def test_the_format_matches_mergekit_multi(pool, tmp_path):
    """mergekit's own loader reads our test file the same way: the same names and dependencies."""
    from mergekit.scripts.multimerge import load_config

    docs = stages_yaml(pool)
    recipe = write(tmp_path / "multi.yml", docs)
    configs, deps = load_config(recipe.read_text(), str(tmp_path / "inter"))
    stages = read_stages(recipe)
    assert set(configs) == {s.name for s in stages}
    assert {k: sorted(v) for k, v in deps.items()} == {s.name: sorted(s.uses) for s in stages}


def test_cli_exit_codes(pool, tmp_path, capsys):
    docs = stages_yaml(pool)
    docs[2]["models"][1]["model"] = "linn"
    recipe = write(tmp_path / "multi.yml", docs)
    assert main(["multi", str(recipe), str(tmp_path / "out")]) == 2
    assert "did you mean stage 'lin'" in capsys.readouterr().err
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    assert main(["multi", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "merged 3 stages, reused 0 cached; removed 2 intermediates" in capsys.readouterr().out


def test_a_data_aware_stage_reads_an_intermediate_and_the_calibration_file_is_part_of_the_key(pool, tmp_path):
    """RegMean on an earlier stage's output: statistics are computed for the intermediate (through
    api.merge, as mergesmith merge does), and the result equals the stages run by hand."""
    from tests.calibrate.calibration_data import write_calibration

    data = write_calibration(tmp_path / "cal.jsonl")
    p = {k: str(v) for k, v in pool.items()}
    calibration = {"files": [str(data)], "samples": 4, "max_length": 8, "batch_size": 2,
                   "cache_dir": str(tmp_path / "stats")}
    docs = [{"name": "avg", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": p["ft1"], "parameters": {"weight": 0.5}},
                        {"model": p["ft2"], "parameters": {"weight": 0.5}}]},
            {"merge_method": "regmean", "dtype": "float32", "parameters": {"alpha": 0.5},
             "models": [{"model": "avg"}, {"model": p["ft3"]}], "calibration": calibration}]
    recipe = write(tmp_path / "multi.yml", docs)
    inter = tmp_path / "cache"
    result = run_multi(recipe, tmp_path / "out", intermediate_dir=inter, keep_intermediates=True)
    hand = by_hand(docs, tmp_path / "hand")
    assert_same(tmp_path / "out", hand["final"])

    keys = [sp.key for sp in result.plan.stages]
    data.write_text(data.read_text() + '{"id": "x", "type": "generation", "prompt": "t5 t6", "references": ["t7"]}\n')
    again = plan_multi(recipe, tmp_path / "out2", intermediate_dir=inter)
    assert again.stages[0].key == keys[0] and again.stages[0].cached
    assert again.stages[1].key != keys[1]


def test_intermediates_go_once_unread_and_a_stopped_run_leaves_none_unless_kept(pool, tmp_path, monkeypatch):
    """Each intermediate is removed as soon as no later stage reads it; a run stopped in its final
    stage removes the rest (nothing half-written remains), and with --keep-intermediates the next
    run resumes from the kept ones."""
    import mergesmith.multistage.run as run_module

    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    inter = tmp_path / "cache"
    real_merge = run_module.merge
    seen: list[list[str]] = []

    def stopped_in_the_final_stage(recipe, out_dir, **kw):
        seen.append(sorted(p.name.split("-")[0] for p in inter.iterdir() if not p.name.startswith(".")))
        if Path(out_dir) == tmp_path / "out":
            raise KeyboardInterrupt
        return real_merge(recipe, out_dir, **kw)

    monkeypatch.setattr(run_module, "merge", stopped_in_the_final_stage)
    with pytest.raises(KeyboardInterrupt):
        run_multi(recipe, tmp_path / "out", intermediate_dir=inter)
    assert seen == [[], ["ties12"], ["lin"]]  # ties12 gone before the final stage, which reads only lin
    assert not inter.exists() and not (tmp_path / "out").exists()

    with pytest.raises(KeyboardInterrupt):
        run_multi(recipe, tmp_path / "out", intermediate_dir=inter, keep_intermediates=True)
    assert sorted(p.name.split("-")[0] for p in inter.iterdir() if not p.name.startswith(".")) == ["lin", "ties12"]
    monkeypatch.setattr(run_module, "merge", real_merge)
    assert run_multi(recipe, tmp_path / "out", intermediate_dir=inter).ran == [""]


def test_mergekit_mapping_form_and_tokenizer_source_refer_to_stages(pool, tmp_path):
    docs = stages_yaml(pool)
    docs[1]["models"][0]["model"] = {"model": {"path": "ties12"}, "lora": {"path": str(pool["adapter"])}}
    docs[2]["tokenizer_source"] = "lin"
    recipe = write(tmp_path / "multi.yml", docs)
    plan = plan_multi(recipe, tmp_path / "out", intermediate_dir=tmp_path / "cache")
    lin, final = plan.stages[1], plan.stages[2]
    assert lin.recipe["models"][0]["model"] == f"{plan.stages[0].out_dir}+{pool['adapter']}"
    assert final.recipe["tokenizer_source"] == str(lin.out_dir)
    # The mapping form and the string form are one recipe, so one key.
    assert lin.key == plan_multi(write(tmp_path / "multi.yml", stages_yaml(pool)), tmp_path / "out",
                                 intermediate_dir=tmp_path / "cache").stages[1].key


def test_mergekit_multi_reuses_any_folder_of_the_stage_name_which_we_do_not(pool, tmp_path):
    """The bug documented in docs/multistage.md: mergekit-multi's stage task returns a folder that
    merely holds a config and weights without reading its recipe (here not even a valid one)."""
    from mergekit.common import ImmutableMap
    from mergekit.options import MergeOptions as MergekitOptions
    from mergekit.scripts.multimerge import MergeModelTask

    stale = tmp_path / "inter" / "ties12"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"stale")
    task = MergeModelTask(config_yaml="merge_method: not-a-method\n", name="ties12", input_merges=ImmutableMap({}),
                          options=MergekitOptions(), out_path=str(stale), lazy=True)
    assert task.execute() == str(stale) and (stale / "model.safetensors").read_bytes() == b"stale"

    # Ours: a folder named for the stage is not a cache entry; the stage runs.
    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))
    result = run_multi(recipe, tmp_path / "out", intermediate_dir=tmp_path / "inter", keep_intermediates=True)
    assert result.ran == ["ties12", "lin", ""] and (stale / "model.safetensors").read_bytes() == b"stale"


def test_the_key_follows_the_options_that_change_tensors_and_not_the_layout(pool, tmp_path):
    from mergesmith.engine.options import MergeOptions

    recipe = write(tmp_path / "multi.yml", stages_yaml(pool))

    def keys(**kw) -> list[str]:
        return [sp.key for sp in plan_multi(recipe, tmp_path / "out", MergeOptions(**kw)).stages]

    plain = keys()
    assert keys(out_shard_size=10 ** 6, chunk_bytes=0, prefetch_bytes=0, threads=1) == plain
    for changed in (keys(random_seed=3), keys(vocab_mismatch="error"), keys(allow_nonfinite=True)):
        assert all(a != b for a, b in zip(changed, plain))
