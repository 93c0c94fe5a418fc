"""Issue 12 for evaluate and compete: arguments checked before work, no litter, no noise, clear task errors.

Principle 6 (arguments checked before any model is loaded), principle 7 (a stopped
merge leaves no partial folder; a finished merge is never reported unfinished),
principle 4 for task files (not UTF-8, wrong JSON types), missing optional extras,
and library noise on the terminal.
"""

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eval_data import MC_ROWS, build_model, build_tokenizer, write_jsonl
from merge_helpers import commit_then_hang, copy_merge, partial_then_sleep
import mergesmith
from mergesmith import checks, extras
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import runner
from mergesmith.evaluate.compete import (DONE, SKIPPED, STOPPED, check_recipe, clean_after_merge, compete,
                                         run_merge_isolated)
from mergesmith.evaluate.tasks import load_tasks
from tiny_models import with_model_type

GEN_ROW = {"id": "g1", "type": "generation", "prompt": "one two three", "references": ["four"]}


def never(*args, **kwargs):
    raise AssertionError("expensive work started before the arguments were checked")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: every check must come first."""
    monkeypatch.setattr(runner, "load_model", never)


def pretend_missing(monkeypatch, *modules):
    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


# ----------------------------------------------------------------------------- principle 6: evaluate


def test_evaluate_reports_every_bad_setting_at_once_before_loading(model_dir, mc_file, no_model_loading):
    with pytest.raises(InputError) as info:
        runner.evaluate(str(model_dir), [mc_file], batch_size=0, bootstrap=-1, max_length=0, device="gpu",
                        dtype="float8", progress=False)
    text = str(info.value)
    assert len(info.value.problems) == 5
    for flag in ("--batch-size 0", "--bootstrap -1", "--max-length 0", "--device 'gpu'", "--dtype 'float8'"):
        assert flag in text


@pytest.mark.parametrize("kwargs, flag", [({"batch_size": -3}, "--batch-size"), ({"batch_size": 2.5}, "--batch-size"),
                                          ({"bootstrap": -1}, "--bootstrap"), ({"max_length": -8}, "--max-length"),
                                          ({"device": "cuda:x"}, "--device"), ({"strategy": "fast"}, "strategy")])
def test_one_bad_setting(model_dir, mc_file, no_model_loading, kwargs, flag):
    with pytest.raises(InputError, match=flag):
        runner.evaluate(str(model_dir), [mc_file], progress=False, **kwargs)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(model_dir, mc_file, no_model_loading, device):
    with pytest.raises(InputError, match=f"--device {device}: .*use --device cpu"):
        runner.evaluate(str(model_dir), [mc_file], device=device, progress=False)


def test_device_auto_and_cpu_are_accepted():
    assert checks.device_problems("auto") == checks.device_problems("cpu") == checks.device_problems(None) == []
    assert checks.resolve_device("auto") in ("cpu", "cuda")


@pytest.mark.parametrize("limit", [0, -1, -100, True, 1.5, "3"])
def test_a_limit_that_would_change_what_is_scored_is_an_error(mc_file, limit):
    with pytest.raises(InputError, match="--limit"):
        load_tasks([mc_file], limit=limit)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(min_value=-10**6, max_value=10**6))
def test_limit_property(mc_file, limit):
    """A limit keeps the first N items, or is refused; it never picks other items."""
    if limit < 1:
        with pytest.raises(InputError, match="--limit"):
            load_tasks([mc_file], limit=limit)
    else:
        (task,) = load_tasks([mc_file], limit=limit)
        assert [i.id for i in task.items] == [r["id"] for r in MC_ROWS][:limit]


def test_a_bad_limit_is_reported_with_the_task_file_problems(tmp_path, mc_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "x", "prompt": "caf\xe9"}\n')
    with pytest.raises(InputError) as info:
        load_tasks([mc_file, bad], limit=0)
    assert len(info.value.problems) == 2 and "--limit 0" in str(info.value) and "bad.jsonl" in str(info.value)


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_evaluate_never_writes_into_the_model_folder(tmp_path, model_dir, mc_file, monkeypatch, capsys, where):
    monkeypatch.setattr(runner, "load_model", never)
    model = tmp_path / "models" / "m"
    model.parent.mkdir()
    model.symlink_to(model_dir)  # symlinks are resolved: the real folder is what counts
    out = {"inside": model / "eval", "same": model, "parent": model_dir.parent}[where]
    before = sorted(os.listdir(model_dir))
    rc = main(["evaluate", str(model), "--tasks", str(mc_file), "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "input model" in capsys.readouterr().err
    assert sorted(os.listdir(model_dir)) == before


def test_evaluate_output_under_a_file_is_found_before_loading(tmp_path, model_dir, mc_file, monkeypatch, capsys):
    monkeypatch.setattr(runner, "load_model", never)
    (tmp_path / "taken").write_text("a file")
    rc = main(["evaluate", str(model_dir), "--tasks", str(mc_file), "--out", str(tmp_path / "taken" / "eval"),
               "--batch-size", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a folder" in err and "--batch-size 0" in err  # one report, both problems


def test_evaluate_never_overwrites_a_task_file(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(runner, "load_model", never)
    tasks = write_jsonl(tmp_path / "predictions.jsonl", MC_ROWS)
    rc = main(["evaluate", str(model_dir), "--tasks", str(tasks), "--out", str(tmp_path), "--no-progress"])
    assert rc == 2 and "would overwrite the input" in capsys.readouterr().err


def test_an_unwritable_output_is_found_before_loading(tmp_path, model_dir, mc_file, monkeypatch, capsys):
    """Root ignores permissions, so the file system's answer is injected: read-only, then full."""
    monkeypatch.setattr(runner, "load_model", never)
    real_access = os.access
    monkeypatch.setattr(checks.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    rc = main(["evaluate", str(model_dir), "--tasks", str(mc_file), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "cannot write in" in capsys.readouterr().err
    monkeypatch.setattr(checks.os, "access", real_access)

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checks.Path, "write_bytes", disk_full)
    rc = main(["evaluate", str(model_dir), "--tasks", str(mc_file), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # the folder the probe created is gone again


def test_interrupted_evaluate_leaves_no_empty_output(tmp_path, model_dir, mc_file, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "load_model", interrupted)
    rc = main(["evaluate", str(model_dir), "--tasks", str(mc_file), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 130 and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- missing extras


def test_extras_helper(monkeypatch):
    pretend_missing(monkeypatch, "peft", "matplotlib")
    with pytest.raises(InputError) as info:
        extras.require_extras("mergesmith zoo build", "zoo")
    text = str(info.value)
    assert "peft, matplotlib" in text and "tokenizers" not in text and "pip install 'mergesmith[zoo]'" in text
    extras.require_extras("x", "zoo", modules=["tokenizers"])  # only what this run needs


def test_rouge_metric_without_rouge_score_is_found_before_loading(tmp_path, model_dir, no_model_loading,
                                                                 monkeypatch):
    pretend_missing(monkeypatch, "rouge_score")
    gen = write_jsonl(tmp_path / "gen.jsonl", [GEN_ROW])
    tasks = load_tasks([gen], metric={"generation": "rougeL"})
    with pytest.raises(InputError, match=r"rouge-score.*pip install 'mergesmith\[eval\]'"):
        runner.evaluate(str(model_dir), tasks, progress=False)


def test_compete_checks_extras_before_merging(tmp_path, monkeypatch):
    pretend_missing(monkeypatch, "rouge_score")
    gen = write_jsonl(tmp_path / "gen.jsonl", [GEN_ROW])
    with pytest.raises(InputError, match=r"mergesmith\[eval\]"):
        compete({}, [gen], tmp_path / "o", budget="1h", merge_fn=never, isolate_merge=False,
                metric={"generation": "rougeL"})
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- principle 6: compete


def test_compete_reports_every_problem_at_once_before_merging(tmp_path, mc_file):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(InputError) as info:
        compete({}, [mc_file, tmp_path / "bad.jsonl"], tmp_path / "file" / "o", budget="soon", batch_size=0,
                bootstrap=-1, device="tpu", dtype="int3", merge_fn=never, isolate_merge=False)
    text = str(info.value)
    for part in ("--budget 'soon'", "--batch-size 0", "--bootstrap -1", "--device 'tpu'", "--dtype 'int3'",
                 "is a file, not a folder", "bad.jsonl: line 1"):
        assert part in text, part


def test_compete_never_replaces_a_task_file(tmp_path):
    out = tmp_path / "run"
    tasks = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    inside = out / "model"
    inside.mkdir(parents=True)
    moved = write_jsonl(inside / "mc2.jsonl", MC_ROWS)
    with pytest.raises(InputError, match="contains the input"):
        compete({}, [tasks, moved], out, budget="1h", overwrite=True, merge_fn=never, isolate_merge=False)
    assert moved.exists()
    clash = write_jsonl(out / "compete.json", MC_ROWS)
    with pytest.raises(InputError, match="compete.json there would overwrite"):
        compete({}, [clash], tmp_path / "run", budget="1h", overwrite=True, merge_fn=never, isolate_merge=False)


def test_compete_passes_the_metric_defaults(tmp_path, model_dir, mc_file):
    recipe = {"models": [{"model": str(model_dir)}]}
    result = compete(recipe, [mc_file], tmp_path / "run", budget="1h", merge_fn=copy_merge, isolate_merge=False,
                     metric={"multiple_choice": "acc_norm_chars"}, progress=False, bootstrap=0)
    assert result.evaluation.tasks[0].headline == "acc_norm_chars"


# ----------------------------------------------------------------------------- principle 7: no litter


def summary_line(result, phase: str) -> str:
    return next(line for line in result.summary().splitlines() if line.split()[0] == phase)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_a_merge_stopped_at_the_deadline_leaves_no_partial_output(tmp_path, mc_file):
    out = tmp_path / "run"
    result = compete({}, [mc_file], out, budget="4s", merge_fn=partial_then_sleep, progress=False, bootstrap=0)
    assert (out / "merge-started").exists()  # the child did start writing before it was stopped
    merge = next(p for p in result.phases if p.name == "merge")
    assert merge.status == STOPPED and "partial output was removed" in merge.detail
    assert leftovers(out) == [] and not (out / "model").exists()


def test_a_merge_committed_before_the_deadline_is_reported_done(tmp_path, mc_file):
    """The child put the model in place, then was stopped before it could say so: the merge finished."""
    out = tmp_path / "run"
    result = compete({}, [mc_file], out, budget="4s", merge_fn=commit_then_hang, progress=False, bootstrap=0)
    phases = {p.name: p for p in result.phases}
    assert phases["merge"].status == DONE and "finished" in phases["merge"].detail
    assert phases["evaluate"].status == SKIPPED and phases["evaluate"].detail == "no time left after the merge"
    assert (out / "model" / "config.json").exists() and leftovers(out) == []
    assert summary_line(result, "merge").endswith("done  (finished as the budget ran out)")
    report = json.loads((out / "compete.json").read_text())
    assert next(p for p in report["phases"] if p["name"] == "merge")["status"] == "done"


def test_a_merge_that_ends_after_the_budget_is_done_not_stopped(tmp_path, model_dir, mc_file):
    from test_compete import FakeClock

    clock = FakeClock()
    recipe = {"models": [{"model": str(model_dir)}], "_advance_clock": clock, "_merge_seconds": 150}
    result = compete(recipe, [mc_file], tmp_path / "run", budget=100, merge_fn=copy_merge, isolate_merge=False,
                     progress=False, bootstrap=0, clock=clock)
    merge = next(p for p in result.phases if p.name == "merge")
    assert merge.status == DONE and merge.detail == "finished as the budget ran out"
    assert (tmp_path / "run" / "model" / "config.json").exists() and not result.complete
    assert summary_line(result, "merge").endswith("done  (finished as the budget ran out)")


def test_ctrl_c_while_the_merge_runs_leaves_no_partial_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()

    def interrupt_once_writing():
        for _ in range(400):
            if (out / "merge-started").exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    # A shell's background job inherits SIGINT ignored, and Python then keeps it ignored: give this
    # test Python's own Ctrl-C handler, whatever started pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_writing, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_merge_isolated(partial_then_sleep, {}, out / "model", {}, timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (out / "merge-started").exists()
    assert leftovers(out) == [] and not (out / "model").exists()


def test_an_interrupted_inline_merge_is_cleaned_and_the_empty_output_removed(tmp_path, mc_file):
    def interrupted(recipe, out_dir, **options):
        partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        partial.mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compete({}, [mc_file], tmp_path / "run", budget="1h", merge_fn=interrupted, isolate_merge=False)
    assert not (tmp_path / "run").exists()


def test_a_stopped_replacement_puts_the_old_model_back(tmp_path):
    """Killed between the writer's two renames (old model moved aside, new one not yet in place)."""
    model = tmp_path / "model"
    old = tmp_path / ".model.old-4242"
    old.mkdir()
    (old / "config.json").write_text("old")
    (tmp_path / ".model.partial-4242").mkdir()
    clean_after_merge(model, 4242)
    assert (model / "config.json").read_text() == "old" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- library noise


def test_no_transformers_noise_but_our_truncation_count(tmp_path, recwarn, capsys):
    import transformers.utils.logging as hf_logging

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 16  # as real checkpoints declare their window
    folder = tmp_path / "m"
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    long = "one two three four five six seven eight nine ten " * 8
    rows = [{"id": "a", "type": "multiple_choice", "prompt": long, "choices": [" red green", " blue yellow"],
             "answer": 0}]
    tasks = load_tasks([write_jsonl(tmp_path / "long.jsonl", rows)])
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logging.warning_once.cache_clear()  # earlier tests may have used up the "once"
    logging.getLogger("transformers").addHandler(handler)
    try:
        result = runner.evaluate(str(folder), tasks, max_length=32, progress=False, bootstrap=0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    shown = [r.getMessage() for r in records] + [str(w.message) for w in recwarn] + [capsys.readouterr().err]
    assert not any("Token indices sequence length" in m for m in shown), shown
    assert not any("past_key_values" in m for m in shown), shown
    assert result.tasks[0].truncated == 1
    assert "1 prompt(s) longer than the context, truncated on the left" in result.table()


# ----------------------------------------------------------------------------- task files: encoding, types


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".yaml"])
def test_a_task_file_that_is_not_utf8_names_the_byte(tmp_path, suffix):
    good = {".jsonl": b'{"id": "a", "type": "generation", "prompt": "p", "references": ["r"]}\n',
            ".csv": b"id,input,eval_type,target\n1,p,generation,r\n",
            ".yaml": b"task: t\ndata: x.jsonl\n"}[suffix]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(good + b"description: caf\xe9 cr\xe8me\n")
    with pytest.raises(InputError) as info:
        load_tasks([path])
    (problem,) = info.value.problems
    line = good.count(b"\n") + 1
    assert str(path) in problem and f"byte {len(good) + 16} (line {line}) is 0xe9" in problem


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
       bad=st.sampled_from([b"\xff", b"\xc3(", b"\xe2\x82", b"\x80", b"\xf0\x28\x8c\x28"]))
def test_non_utf8_offset_property(tmp_path, prefix, bad):
    """Whatever comes before it, the first undecodable byte is the one named."""
    data = prefix.encode("utf-8") + bad + b"\n"
    path = tmp_path / "t.jsonl"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        load_tasks([path])
    expected = len(prefix.encode("utf-8"))
    if prefix.encode("utf-8").startswith(b"\xef\xbb\xbf"):
        pytest.skip("a leading byte order mark is dropped")
    assert f"byte {expected} " in str(info.value)


def test_utf8_with_byte_order_mark_still_reads(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbfid,input,eval_type,target\n1,caf\xc3\xa9,generation,r\n")
    (task,) = load_tasks([path])
    assert task.items[0].prompt == "caf\u00e9"


@pytest.mark.parametrize("row, where", [
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "choices": "ab", "answer": 0}, "field 'choices'"),
    ({"id": "a", "type": "multiple_choice", "prompt": 7, "choices": ["a", "b"], "answer": 0}, "field 'prompt'"),
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "choices": ["a", "b"], "answer": [0]}, "field 'answer'"),
    ({"id": ["a"], "type": "generation", "prompt": "p", "references": ["r"]}, "field 'id'"),
    ({"id": "a", "type": "generation", "prompt": "p", "references": "r"}, "field 'references'"),
    ({"id": "a", "type": ["generation"], "prompt": "p"}, "field 'type'"),
])
def test_wrong_json_types_name_the_row_and_field(tmp_path, row, where):
    path = write_jsonl(tmp_path / "t.jsonl", [MC_ROWS[0], row])
    with pytest.raises(InputError) as info:
        load_tasks([path])
    assert f"{path}: line 2" in str(info.value) and where in str(info.value)


def test_wrong_yaml_types_name_the_field(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    path = tmp_path / "t.yaml"
    path.write_text("data: d.jsonl\nfewshot:\n  num: three\ngeneration: [1]\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_tasks([path])
    assert "fewshot.num" in str(info.value) and "generation" in str(info.value) and str(path) in str(info.value)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.fixed_dictionaries({}, optional={"id": json_values, "prompt": json_values, "choices": json_values,
                                              "answer": json_values, "references": json_values,
                                              "type": st.sampled_from(["multiple_choice", "generation"]) | json_values}))
def test_any_json_row_loads_or_is_one_clear_error(tmp_path, row):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    try:
        load_tasks([path])
    except InputError as err:
        assert all(str(path) in p or "no items" in p for p in err.problems)


def test_a_second_run_on_a_locked_output_stops_at_once(tmp_path, model_dir, mc_file, monkeypatch, capsys):
    """Principle 8 for evaluate and compete: the output is locked for the whole run."""
    from mergesmith.paths import OutputLock

    monkeypatch.setattr(runner, "load_model", never)
    out = tmp_path / "run"
    with OutputLock(out):
        rc = main(["evaluate", str(model_dir), "--tasks", str(mc_file), "--out", str(out), "--no-progress"])
        assert rc == 2 and "another mergesmith run is writing this output" in capsys.readouterr().err
        with pytest.raises(InputError, match="another mergesmith run"):
            compete({"models": [{"model": str(model_dir)}]}, [mc_file], out, budget="1h", merge_fn=never,
                    isolate_merge=False, progress=False)
    assert not out.exists()


def test_no_loading_progress_bar_from_transformers(tmp_path, model_dir, mc_file, capfd):
    """--no-progress means no bar at all: transformers' own "Loading weights" bar is off too."""
    assert main(["evaluate", str(model_dir), "--tasks", str(mc_file), "--out", str(tmp_path / "o"),
                 "--no-progress", "--bootstrap", "0"]) == 0
    assert "Loading weights" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- issue 20: no code from a model folder


@pytest.mark.parametrize("custom_code", [True, False])
def test_evaluate_refuses_a_model_type_transformers_does_not_know(tmp_path, model_dir, mc_file, no_model_loading,
                                                                   capfd, custom_code):
    """Issue 20: this ended with exit 1 after transformers' own warning (with auto_map, after its prompt
    to run the folder's code); now our message comes first, before transformers is asked anything."""
    odd = with_model_type(model_dir, tmp_path / "odd", custom_code=custom_code)
    assert main(["evaluate", str(odd), "--tasks", str(mc_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert f"error: {odd / 'config.json'}: model_type 'fancy_llm'" in err
    assert "never runs code from a model folder (no trust_remote_code)" in err
    assert ("auto_map" in err) == custom_code
    assert "You are using a model of type" not in err and "custom code" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="model_type 'fancy_llm'"):
        runner.evaluate(str(odd), [mc_file], progress=False)


def test_a_model_type_without_a_causal_lm_is_named(tmp_path, model_dir, mc_file, no_model_loading):
    odd = with_model_type(model_dir, tmp_path / "t5", model_type="t5", custom_code=False)
    with pytest.raises(InputError, match="model_type 't5' has no causal language model"):
        runner.evaluate(str(odd), [mc_file], progress=False)


def test_a_tokenizer_that_needs_its_own_code_is_refused_never_run(tmp_path, model_dir, mc_file):
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    config = json.loads((odd / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="FancyTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_fancy.FancyTokenizer", None]})
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="no usable tokenizer .*never runs code from a model folder"):
        runner.evaluate(str(odd), [mc_file], progress=False)


def test_compete_refuses_a_model_it_could_not_run_before_merging(tmp_path, model_dir, mc_file):
    odd = with_model_type(model_dir, tmp_path / "odd")
    recipe = {"merge_method": "linear", "models": [{"model": str(odd), "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError, match="model_type 'fancy_llm'.*no trust_remote_code"):
        compete(recipe, [mc_file], tmp_path / "run", budget="1h", check_fn=check_recipe, merge_fn=never,
                isolate_merge=False)
    assert not (tmp_path / "run").exists()


def test_merging_a_model_type_transformers_does_not_know_is_allowed(tmp_path, model_dir):
    """A merge reads tensors only, never the model's code, so it is no reason to refuse; the config
    (and its auto_map) is kept for whoever runs the result with that code."""
    odd = with_model_type(model_dir, tmp_path / "odd")
    mergesmith.merge({"merge_method": "linear", "models": [{"model": str(odd), "parameters": {"weight": 1.0}}]},
                     tmp_path / "merged", progress=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "fancy_llm"
