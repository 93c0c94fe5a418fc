"""Calibration task files for the tiny models (their tokenizer knows the words t3..t63)."""

from __future__ import annotations

import json
from pathlib import Path


def write_calibration(path: Path, n: int = 7, offset: int = 0) -> Path:
    """Prompts of varying length over the tiny tokenizer's words; a few multiple-choice rows too."""
    rows = []
    for i in range(n):
        words = " ".join(f"t{(i * 7 + j * 3 + offset) % 60 + 3}" for j in range(3 + i % 5))
        rows.append({"id": f"g{i}", "type": "generation", "prompt": words, "references": ["t9"]})
    rows.append({"id": "m0", "type": "multiple_choice", "prompt": "t4 t8 t15", "choices": ["t3", "t5"], "answer": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
