"""Merge functions for compete's tests. Torch-free, so a spawned child process starts fast."""

import os
import shutil
import time
from pathlib import Path


def slow_merge(recipe, out_dir, **options):
    """A merge that would take far longer than any test budget."""
    time.sleep(120)


def copy_merge(recipe, out_dir, **options):
    """'Merge' by copying the first model of the recipe (the budget logic is what is tested)."""
    shutil.copytree(recipe["models"][0]["model"], Path(out_dir))
    clock = recipe.get("_advance_clock")
    if clock is not None:  # a fake clock: the merge takes this long
        clock.advance(recipe["_merge_seconds"])


def _partial_dir(out_dir) -> Path:
    """Where the engine's checkpoint writer builds a model before committing it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"


def partial_then_sleep(recipe, out_dir, **options):
    """Starts writing the model as the engine does (a hidden partial folder), then never finishes."""
    tmp = _partial_dir(out_dir)
    tmp.mkdir(parents=True)
    (tmp / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 4096)
    (Path(out_dir).parent / "merge-started").write_text(str(os.getpid()))
    time.sleep(120)


def commit_then_hang(recipe, out_dir, **options):
    """Commits the model (an atomic rename, as the writer does), then hangs before it can report back."""
    tmp = _partial_dir(out_dir)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    os.rename(tmp, out_dir)
    time.sleep(120)
