"""A tiny search world: a base, three fine-tunes and two multiple-choice task files they can answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def write_mc(path: Path, n: int, offset: int) -> Path:
    rows = [{"id": str(i), "type": "multiple_choice", "prompt": f"t{3 + (i + offset) % 30} t{5 + (i * 7) % 40}",
             "choices": ["t10", "t11", "t12"], "answer": (i + offset) % 3} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def search_world(model_family, tmp_path_factory):
    """(space file, [validation task files], test task file) over model_family('llama', 3)."""
    base, variants = model_family("llama", 3)
    root = tmp_path_factory.mktemp("search-world")
    val = [write_mc(root / "val_a.jsonl", 24, 0), write_mc(root / "val_b.jsonl", 24, 1)]
    test = write_mc(root / "test_a.jsonl", 12, 2)
    space = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
             "parameters": {"normalize": True},
             "models": [{"model": str(v), "parameters": {"weight": {"range": [0, 1]}, "density": {"range": [0.2, 1]}}}
                        for v in variants],
             "tasks": ["val_a.jsonl", {"name": "val_b.jsonl", "weight": 2}]}
    path = root / "space.yml"
    path.write_text(yaml.safe_dump(space))
    return path, val, test
