"""Issue #12's principles for the merge engine and the CLI: never lose a user's model.

Each test names the principle it checks (P1 ... P9). Inputs are fingerprinted
before and after every refused or failed run: a refusal that still touched an
input fails the test.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.checkpoint import writer as writer_module
from mergesmith.cli import main
from mergesmith.engine.tensor import nonfinite_counts
from mergesmith.errors import InputError, ResourceError
from mergesmith.paths import OutputLock, output_problems
from tiny_models import make_model

SRC = Path(__file__).resolve().parents[2] / "src"


def fingerprint(*folders: Path) -> dict[str, str]:
    """Every file under the folders (symlinks not followed) with its content hash."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def linear(*models: Path, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            **extra}


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


def leftovers(parent: Path) -> list[str]:
    """Hidden partial/old folders a run could leave beside its output."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def family(tmp_path, model_family):
    """A private copy of a base and two fine-tunes (tests may damage their copies)."""
    base, (a, b, _) = model_family()
    root = tmp_path / "models"
    copies = []
    for src in (base, a, b):
        dst = root / src.name
        shutil.copytree(src, dst)
        copies.append(dst)
    return copies


# ----------------------------------------------------------------------------- P1: inputs are never touched


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["is_input", "contains_input", "inside_input", "symlink_to_input",
                                   "symlink_to_parent"])
def test_p1_output_overlapping_an_input_is_refused(tmp_path, family, where, overwrite):
    base, a, b = family
    if where == "is_input":
        out = a
    elif where == "contains_input":
        out = a.parent
    elif where == "inside_input":
        out = a / "merged"
    elif where == "symlink_to_input":
        out = tmp_path / "link"
        out.symlink_to(a, target_is_directory=True)
    else:
        (tmp_path / "parentlink").symlink_to(a.parent, target_is_directory=True)
        out = tmp_path / "parentlink" / b.name
    before = fingerprint(base, a, b)
    with pytest.raises(InputError) as err:
        mergesmith.merge(linear(a, b), out, overwrite=overwrite, progress=False)
    assert any("input" in p and "choose" in p for p in err.value.problems), err.value.problems
    assert fingerprint(base, a, b) == before
    assert not leftovers(a.parent) and not (a / "merged").exists()


def test_p1_adapter_and_tokenizer_source_are_inputs_too(tmp_path, family):
    base, a, b = family
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    recipe = linear(a, b, tokenizer_source=str(base))
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, base, overwrite=True, progress=False)
    assert any(str(base) in p and "is the input" in p for p in err.value.problems)
    recipe = {"merge_method": "linear", "models": [{"model": f"{a}+{adapter}", "parameters": {"weight": 1.0}},
                                                   {"model": str(b), "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, adapter / "sub", overwrite=True, progress=False)
    assert any("lies inside the input" in p and str(adapter) in p for p in err.value.problems)


def test_p1_cli_exit_2_and_no_traceback(tmp_path, family, capsys):
    base, a, b = family
    before = fingerprint(a, b)
    recipe = write_recipe(tmp_path, linear(a, b))
    assert main(["merge", str(recipe), str(a), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "would destroy it" in err
    assert fingerprint(a, b) == before


# A small tree: models live in root/models/{m0,m1}; candidate outputs are spelled through
# plain paths, '..', and symlinks to folders at every level.
_CANDIDATES = ["root", "root/models", "root/models/m0", "root/models/m0/sub", "root/models/m1",
               "root/models/m0x", "root/other", "root/other/out", "link_models", "link_models/m0",
               "link_models/m0/deep", "link_m0", "link_m0/x", "root/models/m1/../m0", "root/other/../models/m0x",
               "link_root/models", "link_root/other/new"]


@pytest.fixture(scope="module")
def path_tree(tmp_path_factory):
    top = tmp_path_factory.mktemp("tree")
    for d in ("root/models/m0", "root/models/m1", "root/other"):
        (top / d).mkdir(parents=True)
    (top / "link_models").symlink_to(top / "root/models", target_is_directory=True)
    (top / "link_m0").symlink_to(top / "root/models/m0", target_is_directory=True)
    (top / "link_root").symlink_to(top / "root", target_is_directory=True)
    return top


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(out=st.sampled_from(_CANDIDATES), inputs=st.lists(st.sampled_from(_CANDIDATES[2:6] + ["link_m0"]),
                                                          min_size=1, max_size=3))
def test_p1_property_refused_exactly_when_paths_overlap(path_tree, out, inputs):
    """Whatever the spelling (symlinks, '..'), an output is refused iff it overlaps an input."""
    real_out = Path(os.path.realpath(path_tree / out))
    overlaps = False
    for i in inputs:
        real_in = Path(os.path.realpath(path_tree / i))
        overlaps |= real_out == real_in or real_in in real_out.parents or real_out in real_in.parents
    found = output_problems(path_tree / out, [path_tree / i for i in inputs])
    assert bool(found) == overlaps, (out, inputs, found)


# ----------------------------------------------------------------------------- P3: non-finite values


def poison(model_dir: Path, value: float) -> str:
    """Put ``value`` into one element of one weight of a single-file safetensors model; returns its name."""
    path = model_dir / "model.safetensors"
    state = load_file(path)
    name = next(n for n in state if n.endswith("q_proj.weight"))
    state[name][0, 0] = value
    save_file(state, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_p3_nonfinite_input_is_an_error_naming_model_and_tensor(tmp_path, family, value):
    _, a, b = family
    name = poison(b, value)
    with pytest.raises(InputError) as err:
        mergesmith.merge(linear(a, b), tmp_path / "out", progress=False)
    [msg] = err.value.problems
    assert str(b) in msg and name in msg and "--allow-nonfinite" in msg
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_p3_allow_nonfinite_carries_them_through_with_a_warning(tmp_path, family):
    _, a, b = family
    name = poison(b, float("nan"))
    with pytest.warns(UserWarning, match=name):
        mergesmith.merge(linear(a, b), tmp_path / "out", progress=False, allow_nonfinite=True)
    out = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert torch.isnan(out[name][0, 0]) and torch.isfinite(out[name].flatten()[1:]).all()


def test_p3_method_made_nonfinite_output_names_method_and_tensor(tmp_path, family):
    base, a, b = family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 1e38},
              "models": [{"model": str(a), "parameters": {"weight": 1e38}},
                         {"model": str(b), "parameters": {"weight": 1e38}}]}
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, tmp_path / "out", progress=False)
    [msg] = err.value.problems
    assert "method task_arithmetic produced" in msg and "infinite" in msg
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_p3_overflow_at_the_output_dtype_is_named(tmp_path, family):
    _, a, b = family
    recipe = {"merge_method": "linear", "out_dtype": "float16", "parameters": {"normalize": False},
              "models": [{"model": str(a), "parameters": {"weight": 1e6}},
                         {"model": str(b), "parameters": {"weight": 1e6}}]}
    with pytest.raises(InputError, match="beyond the range of float16"):
        mergesmith.merge(recipe, tmp_path / "out", progress=False)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), nans=st.integers(0, 5), infs=st.integers(0, 5), scale=st.sampled_from([1.0, 1e30, 3e38]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]), seed=st.integers(0, 99))
def test_p3_property_nonfinite_counts_are_exact(n, nans, infs, scale, dtype, seed):
    """The fast path (one sum) never misses a NaN/Inf, and huge finite tensors are not flagged."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    x[~torch.isfinite(x)] = 0  # scale may overflow a narrow dtype: start from finite values only
    idx = torch.randperm(n, generator=g)
    k_nan, k_inf = min(nans, n), min(infs, max(n - nans, 0))
    x[idx[:k_nan]] = float("nan")
    x[idx[k_nan:k_nan + k_inf]] = float("inf")
    expected = (k_nan, k_inf) if k_nan or k_inf else None
    assert nonfinite_counts(x) == expected


# ----------------------------------------------------------------------------- P4: clear messages, exit codes


def test_p4_recipe_not_utf8_names_file_and_byte(tmp_path, family, capsys):
    _, a, b = family
    recipe = tmp_path / "recipe.yml"
    text = yaml.safe_dump(linear(a, b)).encode()
    recipe.write_bytes(text[:10] + b"\xff\xfe" + text[10:])
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: not UTF-8 text: byte 10 (line 1) is 0xff" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, expected", [
    (["--device", "gpu"], "device = 'gpu' is not a device"),
    (["--device", "cuda:x"], "is not a device"),
    (["--threads", "0"], "--threads 0 must be at least 1"),
    (["--out-shard-size", "0"], "--out-shard-size 0"),
])
def test_p4_bad_cli_values_are_exit_2_before_any_work(tmp_path, family, capsys, flags, expected):
    _, a, b = family
    recipe = write_recipe(tmp_path, linear(a, b))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_p4_unparsable_cli_values_are_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mergesmith", "merge", "r.yml", "out", "--out-shard-size", "lots"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert run.returncode == 2 and "is not a size" in run.stderr and "Traceback" not in run.stderr


def test_p4_output_parent_is_a_file(tmp_path, family, capsys):
    _, a, b = family
    (tmp_path / "afile").write_text("x")
    recipe = write_recipe(tmp_path, linear(a, b))
    assert main(["merge", str(recipe), str(tmp_path / "afile" / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_p4_debug_shows_the_traceback(tmp_path, family):
    _, a, b = family
    recipe = write_recipe(tmp_path, linear(a, b))
    with pytest.raises(InputError):
        main(["merge", str(recipe), str(a), "--debug"])


def _inject_pwrite_failure(monkeypatch, code: int, after: int) -> None:
    """Make the writer's pwrite fail with ``code`` after ``after`` successful calls."""
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied")])
def test_p4_write_fault_mid_merge_is_exit_1_and_keeps_the_old_output(tmp_path, family, monkeypatch, capsys,
                                                                      code, text):
    """An injected write failure halfway through: exit 1, one line, old model and inputs intact."""
    _, a, b = family
    recipe = write_recipe(tmp_path, linear(a, b))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    old, inputs = fingerprint(out), fingerprint(a, b)
    _inject_pwrite_failure(monkeypatch, code, after=8)
    assert main(["merge", str(recipe), str(out), "--overwrite", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert text in err and str(out) in err and "Traceback" not in err
    assert fingerprint(out) == old and fingerprint(a, b) == inputs
    assert not leftovers(tmp_path)


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return run.returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path):
    mounts = []

    def make(name: str, options: str) -> Path:
        where = tmp_path / name
        if not _mount_tmpfs(where, options):
            pytest.skip("needs root and a mountable tmpfs (the injected-failure tests cover the same paths)")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_p4_full_disk_on_a_real_small_tmpfs(tmp_path, family, small_tmpfs, monkeypatch, capsys):
    """A 16 KiB tmpfs cannot hold the model: refused up front, exit 1, nothing left on it.

    The free-space check is bypassed once so that the reservation (fallocate) itself
    meets the full disk, as it would when another program fills the disk meanwhile.
    """
    _, a, b = family
    disk = small_tmpfs("disk", "size=16k")
    recipe = write_recipe(tmp_path, linear(a, b))
    assert main(["merge", str(recipe), str(disk / "out"), "--no-progress"]) == 1
    assert "needs" in capsys.readouterr().err
    monkeypatch.setattr("mergesmith.engine.targets.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    assert main(["merge", str(recipe), str(disk / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err
    assert [p.name for p in disk.iterdir()] == [".out.lock"]


def test_p4_read_only_output_directory_on_a_real_tmpfs(tmp_path, family, small_tmpfs, capsys):
    _, a, b = family
    ro = small_tmpfs("ro", "ro,size=1m")
    recipe = write_recipe(tmp_path, linear(a, b))
    assert main(["merge", str(recipe), str(ro / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "read-only" in err.lower() and "Traceback" not in err


def test_p4_read_only_output_injected(tmp_path, family, monkeypatch, capsys):
    _, a, b = family
    recipe = write_recipe(tmp_path, linear(a, b))
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if ".partial-" in self.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "the file system is read-only" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- P5: all problems at once


def test_p5_recipe_model_and_output_problems_in_one_error(tmp_path, family):
    base, a, b = family
    (b / "config.json").write_text("{not json")
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 7}},
                         {"model": str(b), "parameters": {"weight": 1.0}},
                         {"model": str(tmp_path / "missing"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, a / "out", progress=False, threads=-1)
    text = "\n".join(err.value.problems)
    assert "density = 7 must be in (0, 1]" in text  # the recipe
    assert "config.json" in text and "missing: no such model folder" in text  # the models
    assert "lies inside the input" in text  # the output path
    assert "--threads -1" in text  # the options


def test_p5_unknown_method_still_checks_the_models(tmp_path, family):
    _, a, _ = family
    with pytest.raises(InputError) as err:
        mergesmith.merge({"merge_method": "tie", "models": [{"model": str(a)}, {"model": str(tmp_path / "x")}]},
                         tmp_path / "out", progress=False)
    text = "\n".join(err.value.problems)
    assert "merge_method = 'tie'" in text and "no such model folder" in text


# ----------------------------------------------------------------------------- P7: no litter on interrupt


def test_p7_ctrl_c_mid_merge_leaves_nothing(tmp_path, family, monkeypatch, capsys):
    _, a, b = family
    recipe = write_recipe(tmp_path, linear(a, b))
    real = writer_module.CheckpointWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, tensor)

    monkeypatch.setattr(writer_module.CheckpointWriter, "write", write)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 130
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


_SLOW_MERGE = textwrap.dedent("""
    import sys, time
    import mergesmith.engine.stream as stream
    real = stream.run_method
    def slow(*args, **kwargs):
        print("merging", flush=True)
        time.sleep(0.2)
        return real(*args, **kwargs)
    stream.run_method = slow
    from mergesmith.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_p7_sigterm_mid_merge_leaves_nothing_and_a_sigkill_leftover_is_cleaned(tmp_path, family):
    _, a, b = family
    recipe = write_recipe(tmp_path, linear(a, b))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-c", _SLOW_MERGE, "merge", str(recipe), str(out), "--no-progress"]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "merging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and not out.exists() and not leftovers(tmp_path)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "merging"
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists() and leftovers(tmp_path) == [f".out.partial-{proc.pid}"]  # hidden, never a model
    mergesmith.merge(linear(a, b), out, progress=False)  # the next run cleans up after the dead one
    assert out.is_dir() and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- P8: one run per output


def test_p8_second_run_on_a_locked_output_fails_at_once(tmp_path, family, monkeypatch):
    _, a, b = family
    out = tmp_path / "out"
    read = []
    monkeypatch.setattr("mergesmith.engine.stream.load_inputs", lambda *args: read.append(1) or [])
    with OutputLock(out):
        start = time.monotonic()
        with pytest.raises(InputError, match=f"another mergesmith run is writing this output \\(process {os.getpid()}"):
            mergesmith.merge(linear(a, b), out, progress=False)
        assert time.monotonic() - start < 10
    assert not read and not out.exists()


def test_p8_lock_is_released_after_a_run_and_after_a_crash(tmp_path, family):
    _, a, b = family
    out = tmp_path / "out"
    mergesmith.merge(linear(a, b), out, progress=False)
    mergesmith.merge(linear(a, b), out, progress=False, overwrite=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from mergesmith.paths import OutputLock
        OutputLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(InputError, match="another mergesmith run"):
        mergesmith.merge(linear(a, b), out, progress=False, overwrite=True)
    holder.kill()
    holder.wait()
    mergesmith.merge(linear(a, b), out, progress=False, overwrite=True)  # the kernel dropped the dead lock


# ----------------------------------------------------------------------------- P9: compatibility


def test_p9_slerp_t_outside_0_1_is_a_warning_not_an_error(tmp_path, family):
    base, a, _ = family
    recipe = write_recipe(tmp_path, {"merge_method": "slerp", "base_model": str(base),
                                     "models": [{"model": str(base)}, {"model": str(a)}],
                                     "parameters": {"t": [0.2, 1.3]}})
    with pytest.warns(UserWarning, match=r"parameters\.t\[1\] = 1\.3 is outside \[0, 1\]"):
        mergesmith.merge(recipe, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").is_file()


def test_resource_error_is_not_an_input_error():
    assert not issubclass(ResourceError, InputError)


def test_p4_bad_tokenizer_config_is_found_before_the_merge_not_after(tmp_path, family):
    base, a, b = family
    (a / "tokenizer_config.json").write_bytes(b'{"x": "\xff"}')
    with pytest.raises(InputError, match=r"tokenizer_config.json: not UTF-8 text: byte 7 \(line 1\) is 0xff"):
        mergesmith.merge(linear(a, b, chat_template="{{ messages }}"), tmp_path / "out", progress=False)
    (a / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a JSON object"):
        mergesmith.merge(linear(a, b, chat_template="{{ messages }}"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_p1_the_recipe_file_and_calibration_data_are_inputs_too(tmp_path, family):
    _, a, b = family
    folder = tmp_path / "work"
    folder.mkdir()
    recipe = write_recipe(folder, linear(a, b))
    with pytest.raises(InputError, match="contains the input the recipe"):
        mergesmith.merge(recipe, folder, overwrite=True, progress=False)
    assert recipe.is_file()
    calibration = folder / "calib.jsonl"
    calibration.write_text('{"id": "1", "type": "generation", "prompt": "t3 t4", "references": ["t5"]}\n')
    base, _, _ = family
    recipe = write_recipe(tmp_path, {"merge_method": "regmean", "calibration": {"files": [str(calibration)]},
                                     "models": [{"model": str(a)}, {"model": str(b)}]}, "regmean.yml")
    with pytest.raises(InputError, match=f"is the input calibration file {calibration}"):
        mergesmith.merge(recipe, calibration, overwrite=True, progress=False)
    assert calibration.is_file()


def test_p7_a_model_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path, family):
    """SIGKILL between the writer's two renames leaves the old model in .out.old-PID: never lost."""
    _, a, b = family
    out = tmp_path / "out"
    mergesmith.merge(linear(a, b), out, progress=False)
    before = {Path(k).name: v for k, v in fingerprint(out).items()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(out, tmp_path / f".out.old-{int(dead.stdout)}")
    with pytest.raises(InputError, match="already exists"):
        mergesmith.merge(linear(a, b), out, progress=False)  # the old model is back, so no overwrite
    assert {Path(k).name: v for k, v in fingerprint(out).items()} == before and not leftovers(tmp_path)


def test_write_safetensors_streams_a_file_safetensors_reads_back(tmp_path):
    """One tensor asked for at a time, in order; safetensors reads every tensor back, bit for bit."""
    from mergesmith.checkpoint.writer import OutputTensor, write_safetensors

    tensors = {"b": torch.randn(3, 5, dtype=torch.float64), "a": torch.arange(7, dtype=torch.float32),
               "c": torch.randn(2, 2).to(torch.bfloat16), "scalar": torch.tensor(2.5)}
    asked: list[str] = []

    def produce(name):
        asked.append(name)
        return tensors[name]

    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_safetensors(tmp_path / "s.safetensors", specs, produce)
    assert asked == list(tensors)
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with pytest.raises(RuntimeError, match="planned torch.float32 \\[7\\], got torch.float64"):
        write_safetensors(tmp_path / "bad.safetensors", [OutputTensor("a", torch.float32, (7,))],
                          lambda name: tensors["a"].double())
