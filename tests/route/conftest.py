"""Fixtures for the routing tests: two tiny experts, a base, a merge, and their task files."""

import pytest

from route_data import make_experts, write_task


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("route-models"))


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """``a``, ``b``: train files (lists, as a recipe's data); ``val_*``, ``gen_*``: validation files."""
    root = tmp_path_factory.mktemp("route-data")
    out = {s: [write_task(root / "train" / "mc" / f"{s}.jsonl", s, n=8, seed=1)] for s in "ab"}
    out.update({f"val_{s}": write_task(root / "validation" / "mc" / f"{s}.jsonl", s, n=6, seed=2) for s in "ab"})
    out.update({f"gen_{s}": write_task(root / "validation" / "gen" / f"{s}.jsonl", s, n=3, seed=3, generation=True)
                for s in "ab"})
    return out
