"""Sizes as people write them (``5GB``, ``2GiB``) and read them (``1.5 KiB``); durations as they write them (``1h30m``)."""

from __future__ import annotations

import argparse
import re
from typing import Union

from mergesmith.errors import InputError

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_BUDGET_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000000' -> 1e6."""
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit, binary = float(m[1]), m[2].lower(), m[3].lower().startswith("i")
    scale = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]  # the power of 1000 (or 1024): bytes are 0
    return int(number * (1024 if binary else 1000) ** scale)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_budget(text: Union[str, float, int]) -> float:
    """'1h', '45m', '90s', '1h30m', '3600' (seconds) -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _BUDGET_RE.match(text.strip().lower().replace(" ", ""))
        if not text.strip() or not m or not any(m.groups()):
            raise InputError(f"--budget {text!r} is not a duration; write e.g. 1h, 45m, 90s or 1h30m")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise InputError(f"--budget {text!r} must be more than zero")
    return seconds
