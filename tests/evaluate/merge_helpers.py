"""Merge functions for compete's tests. Torch-free, so a spawned child process starts fast."""

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
