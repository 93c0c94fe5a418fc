"""Engine behaviour: formats in and out, atomic finish, dry run, vocab resizing, dtypes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergesmith
from mergesmith.engine import stream, targets
from mergesmith.cli import main
from mergesmith.errors import InputError
from tiny_models import load_state, make_model


def linear(*paths, **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths], **extra}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_merged_model_loads_and_runs(tmp_path, model_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, (a, b, _) = model_family()
    mergesmith.merge(linear(a, b), tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("t5 t6 t7", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, 3, 64)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "linear" in card and str(a) in card
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("when", ["exception", "interrupt"])
def test_failure_midway_leaves_no_output(tmp_path, model_family, monkeypatch, when):
    _, (a, b, _) = model_family()
    calls = {"n": 0}
    real = stream.run_method

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt if when == "interrupt" else RuntimeError("boom")
        return real(*args, **kw)

    monkeypatch.setattr(stream, "run_method", flaky)
    with pytest.raises(KeyboardInterrupt if when == "interrupt" else RuntimeError):
        mergesmith.merge(linear(a, b), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_model(tmp_path, model_family, monkeypatch):
    _, (a, b, c) = model_family()
    mergesmith.merge(linear(a, b), tmp_path / "out", progress=False)
    before = load_state(tmp_path / "out")
    monkeypatch.setattr(targets, "write_side_files", lambda *a: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(RuntimeError):
        mergesmith.merge(linear(a, c), tmp_path / "out", progress=False, overwrite=True)
    after = load_state(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert leftovers(tmp_path) == []


def test_killed_process_leaves_nothing_that_looks_finished(tmp_path, model_family):
    """SIGKILL cannot be cleaned up after; the output path must still not exist."""
    _, (a, b, _) = model_family()
    import yaml
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear(a, b)))
    script = (f"import time, mergesmith.engine.stream as e\n"
              f"real = e.run_method\n"
              f"def slow(*a, **k):\n    time.sleep(0.2)\n    return real(*a, **k)\n"
              f"e.run_method = slow\n"
              f"from mergesmith.cli import main\nmain(['merge', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '--no-progress'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    for _ in range(200):
        if leftovers(tmp_path):
            break
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read().decode())
        import time
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    partial = leftovers(tmp_path)
    assert partial and all(p.startswith(".out.partial-") for p in partial)


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, model_family, capsys):
    import yaml
    base, (a, b, _) = model_family()
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": 1, "density": 0.5}},
        {"model": str(b), "parameters": {"weight": 1, "density": 0.5}}]}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight"):
        assert name in out
    assert "predicted peak memory" in out and "bytes to read" in out
    assert out.count(f"{a}:model.layers.1.self_attn.q_proj.weight") == 1


def test_bin_and_sharded_inputs_give_the_same_merge(tmp_path, model_family):
    base, (a, b, _) = model_family()
    from transformers import AutoModelForCausalLM
    # The same weights, saved as PyTorch .bin and as several safetensors shards.
    m = AutoModelForCausalLM.from_pretrained(b)
    (tmp_path / "b_bin").mkdir()
    torch.save({k: v.clone() for k, v in m.state_dict().items()}, tmp_path / "b_bin" / "pytorch_model.bin")
    (tmp_path / "b_bin" / "config.json").write_text((b / "config.json").read_text())
    m.save_pretrained(tmp_path / "b_sharded", max_shard_size="10KB")
    assert list((tmp_path / "b_bin").glob("*.bin"))
    assert len(list((tmp_path / "b_sharded").glob("*.safetensors"))) > 1
    ref = mergesmith.merge(linear(a, b), tmp_path / "ref", progress=False)
    mergesmith.merge(linear(a, tmp_path / "b_bin"), tmp_path / "from_bin", progress=False)
    mergesmith.merge(linear(a, tmp_path / "b_sharded"), tmp_path / "from_shards", progress=False,
                     out_shard_size=20_000)
    want = load_state(tmp_path / "ref")
    for other in ("from_bin", "from_shards"):
        got = load_state(tmp_path / other)
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert len(list((tmp_path / "from_shards").glob("model-*.safetensors"))) > 1
    assert ref.tensors_written == len(want)


def test_vocab_mismatch_resizes_with_warning_naming_tokens(tmp_path, model_family):
    base, (a, _, _) = model_family()
    big = make_model(tmp_path / "big", "llama", seed=5, base=base, vocab=70)
    with pytest.warns(UserWarning) as record:
        mergesmith.merge(linear(a, big), tmp_path / "out", progress=False)
    text = " ".join(str(w.message) for w in record)
    assert "rows 64..69" in text and "'t64'" in text and "dropped" in text
    out, sa, sb = load_state(tmp_path / "out"), load_state(a), load_state(big)
    emb = "model.embed_tokens.weight"
    assert out[emb].shape == (64, 16)
    assert torch.allclose(out[emb], (sa[emb] + sb[emb][:64]) / 2)
    with pytest.raises(InputError, match="vocabulary of 70 rows"):
        mergesmith.merge(linear(a, big), tmp_path / "out2", progress=False, vocab_mismatch="error")


def test_smaller_vocab_padded_from_reference(tmp_path, model_family):
    base, (a, _, _) = model_family()
    small = make_model(tmp_path / "small", "llama", seed=6, base=base, vocab=60)
    with pytest.warns(UserWarning, match="rows 60..63 are taken from"):
        mergesmith.merge(linear(a, small), tmp_path / "out", progress=False)
    out, sa, ss = load_state(tmp_path / "out"), load_state(a), load_state(small)
    emb = "lm_head.weight"
    assert torch.allclose(out[emb][:60], (sa[emb][:60] + ss[emb]) / 2)
    assert torch.allclose(out[emb][60:], sa[emb][60:])


def test_dtypes_and_config(tmp_path, model_family):
    _, (a, b, _) = model_family()
    bf = make_model(tmp_path / "bf", "llama", seed=3, dtype=torch.bfloat16)
    bf2 = make_model(tmp_path / "bf2", "llama", seed=4, dtype=torch.bfloat16)
    # No dtype: compute in float32, write in the inputs' dtype.
    mergesmith.merge({"merge_method": "linear", "models": [{"model": str(bf), "parameters": {"weight": 1.0}},
                                                            {"model": str(bf2), "parameters": {"weight": 1.0}}]},
                     tmp_path / "o1", progress=False)
    o1, s1, s2 = load_state(tmp_path / "o1"), load_state(bf), load_state(bf2)
    k = "model.layers.0.mlp.up_proj.weight"
    assert o1[k].dtype == torch.bfloat16
    assert torch.equal(o1[k], ((s1[k].float() + s2[k].float()) / 2).to(torch.bfloat16))
    mergesmith.merge(linear(a, b, out_dtype="bfloat16"), tmp_path / "o2", progress=False)
    assert load_state(tmp_path / "o2")[k].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "o2" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_tokenizer_source_and_slices_config(tmp_path, model_family):
    _, (a, b, _) = model_family()
    (b / "tokenizer.json").read_text()
    other_tok = make_model(tmp_path / "tok", "llama", seed=9, vocab=64)
    (other_tok / "tokenizer_config.json").write_text(json.dumps({"marker": "from-tok-model"}))
    r = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": str(other_tok),
         "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                    {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    mergesmith.merge(r, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["marker"] == "from-tok-model"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5
    out, sb = load_state(tmp_path / "out"), load_state(b)
    assert torch.equal(out["model.layers.4.self_attn.o_proj.weight"], sb["model.layers.2.self_attn.o_proj.weight"])


def test_cuda_request_without_cuda_is_an_input_error(tmp_path, model_family):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, (a, b, _) = model_family()
    with pytest.raises(InputError, match="CUDA is not available"):
        mergesmith.merge(linear(a, b), tmp_path / "out", progress=False, device="cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ties", "slerp", "dare_ties"])
def test_cuda_merge_matches_cpu(tmp_path, model_family, method):
    base, (a, b, _) = model_family()
    if method == "slerp":
        r = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(a)}],
             "parameters": {"t": [0.2, 0.8]}}
    else:
        r = {"merge_method": method, "base_model": str(base), "random_seed": 3,
             "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.6}} for p in (a, b)]}
    mergesmith.merge({**r, "dtype": "float32"}, tmp_path / "cpu", progress=False)
    mergesmith.merge({**r, "dtype": "float32"}, tmp_path / "gpu", progress=False, device="cuda")
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "gpu")
    if method == "dare_ties":  # CUDA and CPU generators draw different streams from one seed
        k = "model.layers.1.mlp.up_proj.weight"
        assert abs((cpu[k] != load_state(base)[k]).float().mean() - (gpu[k] != load_state(base)[k]).float().mean()) < 0.05
        return
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], rtol=1e-5, atol=1e-6), k


def test_tied_input_contributes_its_embedding_as_lm_head(tmp_path, model_family):
    _, (a, _, _) = model_family()  # untied llama
    tied = make_model(tmp_path / "tied", "llama", seed=11, tied=True)
    assert "lm_head.weight" not in load_state(tied)
    mergesmith.merge(linear(a, tied), tmp_path / "out", progress=False)
    out, sa, st = load_state(tmp_path / "out"), load_state(a), load_state(tied)
    assert torch.allclose(out["lm_head.weight"], (sa["lm_head.weight"] + st["model.embed_tokens.weight"]) / 2)


def test_folder_without_weights_is_named(tmp_path, model_family):
    _, (a, _, _) = model_family()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((a / "config.json").read_text())
    with pytest.raises(InputError, match="no model weights found"):
        mergesmith.merge(linear(a, empty), tmp_path / "out", progress=False)


def test_the_math_runs_on_the_threads_asked_for_in_a_fresh_thread(tmp_path, model_family, monkeypatch):
    """torch gives a thread its count on its first parallel op, from the count some thread last
    asked for; the reader and writer ask for one. A merge started in a thread that has run nothing
    parallel yet (as ``mergesmith merge``'s main thread) must still do its math on --threads."""
    import dataclasses
    import threading

    from mergesmith.methods import base as methods_base

    spec = methods_base._REGISTRY["linear"]
    seen = []

    def counting(group):
        torch.ones(1 << 16).sum()  # a parallel op: the thread's count is settled by now
        seen.append(torch.get_num_threads())
        return spec.fn(group)

    monkeypatch.setitem(methods_base._REGISTRY, "linear", dataclasses.replace(spec, fn=counting))
    _, (a, b, _) = model_family()
    recipe = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b)]}
    errors = []

    def run():
        try:
            mergesmith.merge(recipe, tmp_path / "out", progress=False, threads=2)
        except Exception as err:  # reported below, on the test's thread
            errors.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert not errors, errors
    assert seen and set(seen) == {2}


_TEAM_PROBE = r"""
import os, sys, threading, torch
from concurrent.futures import ThreadPoolExecutor
from mergesmith.engine.stream import _start_single_threaded

def os_threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
torch.ones(1 << 16).sum()  # the main thread's own team
with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
    for pool in (reader, writer):
        pool.submit(int).result()  # the pool threads exist, having run no torch op
    started = os_threads()
    if sys.argv[1] == "ours":
        _start_single_threaded((reader, writer), 2)
    else:  # what the stream did before: each pool's first op at the shared count of two
        for pool in (reader, writer):
            pool.submit(lambda: (torch.ones(1 << 16).sum(), torch.set_num_threads(1))).result()
        torch.set_num_threads(2)
    for pool in (reader, writer):  # conversions, as the reader and writer do
        pool.submit(lambda: torch.ones(1 << 20).to(torch.float64).sum()).result()
    math = torch.get_num_threads()
    torch.ones(1 << 20).sum()
    print(started, os_threads(), math)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts the process's threads in /proc on a machine with two or more cores")
@pytest.mark.parametrize("start", ["ours", "shared-count"])
def test_reader_and_writer_build_no_openmp_team_of_their_own(start):
    """With more OpenMP threads alive than cores, libgomp sleeps at every barrier instead of
    spinning, which made a two-thread TSV-M merge twice as slow as a one-thread one
    (stream._start_single_threaded). After the pools' conversions the process must have no
    more threads than when the pool threads had just started, and the math still runs on two.
    The old start (first op at the shared count) is run too, to show that the count sees a
    team when there is one."""
    out = subprocess.run([sys.executable, "-c", _TEAM_PROBE, start], capture_output=True, text=True, check=True)
    started, after, math = map(int, out.stdout.split())
    assert math == 2
    if start == "ours":
        assert after == started
    else:
        assert after > started
