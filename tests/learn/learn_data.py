"""Unlabeled prompts for the tiny model family (its word-level tokenizer knows t3..t63)."""

from __future__ import annotations

import json
from pathlib import Path


def write_prompts(path: Path, n_choice: int = 6, n_gen: int = 4, offset: int = 0) -> Path:
    """Multiple-choice rows (answers null: unlabeled) and generation rows (no references)."""
    rows = []
    for i in range(n_choice):
        words = " ".join(f"t{(i * 5 + j * 7 + offset) % 60 + 3}" for j in range(2 + i % 4))
        choices = [f"t{(i + k * 11 + offset) % 60 + 3}" for k in range(2 + i % 2)]
        rows.append({"id": f"m{i}", "type": "multiple_choice", "prompt": words, "choices": choices, "answer": None})
    for i in range(n_gen):
        words = " ".join(f"t{(i * 13 + j * 3 + offset) % 60 + 3}" for j in range(3 + i % 3))
        rows.append({"id": f"g{i}", "type": "generation", "prompt": words, "references": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
