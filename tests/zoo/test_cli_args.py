"""Issue 12, principle 6 for ``mergesmith zoo build`` and ``mergesmith bench``: every argument,
folder and optional package is checked before the zoo is built. No test here builds a zoo:
building is replaced by a function that fails the test."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergesmith import extras
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.zoo import bench as BN
from mergesmith.zoo import build as B


def never(*args, **kwargs):
    raise AssertionError("the zoo was being built before the arguments were checked")


@pytest.fixture(autouse=True)
def no_building(monkeypatch):
    monkeypatch.setattr(B, "build_data", never)
    monkeypatch.setattr(B, "build_base", never)


def pretend_missing(monkeypatch, *modules):
    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def bench(tmp_path, *args):
    return main(["bench", "--size", "test", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                 *args])


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--limit", "-5"], "--limit -5"),
    (["--val-limit", "0"], "--val-limit 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--seeds", "1", "1"], "--seeds: 1 given more than once"),
    (["--seeds", "-1"], "--seeds -1"),
    (["--seed", "-2"], "--seed -2"),
    (["--methods", "nope"], "'nope' is not a merge method"),
    (["--methods", "linear,linear"], "linear named more than once"),
    (["--methods", ","], "name at least one method"),
    (["--device", "gpu"], "--device 'gpu': not a device"),
    (["--vocab", "onion"], "--vocab: onion not a vocabulary row"),
])
def test_bench_refuses_bad_arguments_before_building(tmp_path, capsys, args, message):
    assert bench(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_bench_reports_every_problem_at_once(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["bench", "--size", "test", "--cache", str(tmp_path / "file"), "--out", str(tmp_path / "file" / "o"),
               "--limit", "0", "--batch-size", "-1", "--methods", "ties,nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "5 problems" in err
    for part in ("--limit 0", "--batch-size -1", "'nope'", "--cache", "--out"):
        assert part in err, part


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_cuda_without_cuda(tmp_path, capsys):
    assert bench(tmp_path, "--device", "cuda") == 2
    assert "--device cuda" in capsys.readouterr().err


def test_bench_names_the_missing_extra_before_building(tmp_path, monkeypatch, capsys):
    pretend_missing(monkeypatch, "matplotlib")
    assert bench(tmp_path, "--methods", "linear") == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'mergesmith[zoo]'" in err


def test_bench_unwritable_output_found_first(tmp_path, monkeypatch, capsys):
    import mergesmith.checks as checks

    real = checks.os.access
    monkeypatch.setattr(checks.os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    assert bench(tmp_path, "--methods", "linear") == 2
    assert "cannot write in" in capsys.readouterr().err


def test_zoo_build_refuses_bad_arguments_before_building(tmp_path, capsys):
    rc = main(["zoo", "build", "--size", "test", "--seed", "-1", "--finetune-seed", "-4", "--device", "cuda:x",
               "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "3 problems" in err
    assert "--seed -1" in err and "--finetune-seed -4" in err and "--device 'cuda:x'" in err


def test_zoo_build_names_the_missing_extra_before_building(tmp_path, monkeypatch, capsys):
    pretend_missing(monkeypatch, "peft")
    assert main(["zoo", "build", "--size", "test", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "needs the optional package peft" in err and "pip install 'mergesmith[zoo]'" in err


def test_zoo_build_cache_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["zoo", "build", "--size", "test", "--cache", str(tmp_path / "f" / "c")]) == 2
    assert "--cache" in capsys.readouterr().err


def test_library_api_is_checked_too(tmp_path):
    with pytest.raises(InputError, match="--seeds: give at least one"):
        BN.run_bench(BN.BenchConfig(out=tmp_path / "o", size="test", seeds=(), methods=("linear",),
                                    cache=tmp_path / "c"), log=never)
    with pytest.raises(InputError, match="--size 'huge'"):
        B.build_zoo("huge", cache_dir=tmp_path)
    with pytest.raises(InputError, match="--finetune-seed 1.5"):
        B.build_zoo("test", finetune_seed=1.5, cache_dir=tmp_path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.none() | st.integers(-1000, 1000), val_limit=st.none() | st.integers(-1000, 1000),
       batch=st.integers(-50, 50), seeds=st.lists(st.integers(-3, 5), max_size=4))
def test_config_problems_property(tmp_path, limit, val_limit, batch, seeds):
    """A configuration is refused exactly when one of its numbers would change what runs."""
    cfg = BN.BenchConfig(out=tmp_path / "o", size="test", seeds=tuple(seeds), methods=("linear",),
                         cache=tmp_path / "c", limit=limit, val_limit=val_limit, batch_size=batch)
    bad = (limit is not None and limit < 1) or (val_limit is not None and val_limit < 1) or batch < 1 \
        or not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds)
    assert bool(BN.config_problems(cfg)) == bad


def test_zoo_builds_of_one_world_take_turns(tmp_path, monkeypatch, capfd):
    """Principle 8 for the zoo cache: a second build of the same world waits for the first."""
    import threading
    import time

    from mergesmith.paths import OutputLock

    calls = []
    monkeypatch.setattr(B, "require_extras", lambda *args: None)
    monkeypatch.setattr(B, "_build_locked", lambda *args: calls.append(time.monotonic()) or "built")
    root = B.zoo_root("test", 0, tmp_path)
    results = []
    with OutputLock(root.parent):
        worker = threading.Thread(target=lambda: results.append(B.build_zoo("test", 0, tmp_path, progress=False)))
        worker.start()
        time.sleep(1.0)
        assert not calls and worker.is_alive()  # waiting, not building alongside
        released = time.monotonic()
    worker.join(30)
    assert results == ["built"] and calls[0] >= released
    assert "waiting for another mergesmith run" in capfd.readouterr().err


def test_bench_no_progress_reaches_the_config(tmp_path, monkeypatch):
    """``--no-progress`` turns the bench's bars off (its log lines stay), as every long command's."""
    import mergesmith.zoo.bench as bench_module

    seen = []
    monkeypatch.setattr(bench_module, "run_bench", lambda cfg: seen.append(cfg.progress) or "")
    for extra, expected in (((), True), (("--no-progress",), False)):
        assert main(["bench", "--size", "test", "--methods", "linear", "--cache", str(tmp_path / "c"),
                     "--out", str(tmp_path / "out"), *extra]) == 0
        assert seen[-1] is expected
