"""Strict JSON for files that come with a checkpoint: headers, indexes, configs.

Python's ``json`` module is lenient where a hostile or damaged file needs
strictness: it recurses once per nesting level (a header of 10^6 ``[`` ends in
a ``RecursionError``), keeps the last of two equal keys without a word, and
reports bad UTF-8 with no position a user can look up. ``parse_json`` turns
each of these into an ``InputError`` naming the file, the byte offset or the
key, and the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mergesmith.errors import InputError, decode_utf8

MAX_JSON_FILE_BYTES = 100 * 1024 * 1024
# Real files nest a few levels (config.json: text_config.rope_scaling...; a
# safetensors header: 3). Far deeper means damage or an attack on the parser.
MAX_JSON_DEPTH = 64

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(r"\[\]|\{\}")


class _NonStandardConstant(Exception):
    def __init__(self, name: str):
        self.name = name


def _refuse_constant(name: str) -> Any:
    raise _NonStandardConstant(name)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def nesting_deeper_than(text: str, limit: int) -> bool:
    """Whether ``text`` nests arrays and objects more than ``limit`` deep.

    Strings are dropped (their brackets are data), then each pass removes the
    innermost ``[]``/``{}`` pairs: a document of depth d empties in d passes,
    each a linear regex scan in C, so a 100 MB header costs at most
    ``limit`` scans and no Python recursion. An unbalanced skeleton stops
    shrinking and is left to the parser to report.
    """
    skeleton = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(limit):
        if not skeleton:
            return False
        skeleton, removed = _INNERMOST_PAIR.subn("", skeleton)
        if not removed:
            return False
    return bool(skeleton)


def parse_json(raw: bytes, path: Path, what: str, *, start: int = 0, duplicates: bool = True,
               constants: bool = True, fix: str = "re-download it or re-save it") -> Any:
    """Decode UTF-8 JSON from ``raw`` (found at byte ``start`` of ``path``); raise InputError.

    ``duplicates=False`` refuses an object that names one key twice (in a
    safetensors header that would be two tensors of one name). ``constants=False``
    refuses ``NaN``, ``Infinity`` and ``-Infinity``, which Python writes and reads but
    JSON does not have (the safetensors library refuses a header holding one; a
    ``config.json`` written by Python may hold one, so configs keep them).
    """
    text = decode_utf8(raw, path, what=f"the {what} ", offset=start, lines=False, fix=fix)
    if nesting_deeper_than(text, MAX_JSON_DEPTH):
        raise InputError(f"{path}: the {what} nests arrays or objects more than {MAX_JSON_DEPTH} deep; "
                         f"the file is corrupt or hostile: {fix}")
    try:
        return json.loads(text, object_pairs_hook=None if duplicates else _refuse_duplicates,
                          parse_constant=None if constants else _refuse_constant)
    except _NonStandardConstant as err:
        raise InputError(f"{path}: the {what} holds {err.name}, which is not JSON; "
                         f"the file is corrupt or hostile: {fix}") from None
    except _DuplicateKey as err:
        raise InputError(f"{path}: the {what} names key {err.key!r} twice in one object; "
                         f"the file is corrupt or hostile: {fix}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: the {what} is not valid JSON ({err.msg} at line {err.lineno} "
                         f"column {err.colno}); {fix}") from None
    except (ValueError, RecursionError) as err:  # an integer of 10^4 digits, or a stack the scan did not foresee
        raise InputError(f"{path}: the {what} cannot be parsed ({err}); {fix}") from None


def read_json_file(path: Path, what: str, *, duplicates: bool = True,
                   fix: str = "re-download it or re-save it") -> Any:
    """``parse_json`` of a whole file; a missing file raises FileNotFoundError for the caller to word."""
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:  # configs and indexes are kilobytes; never read gigabytes to find out
        raise InputError(f"{path}: the {what} is {size} bytes, more than the {MAX_JSON_FILE_BYTES} allowed; "
                         f"the file is corrupt or hostile: {fix}")
    return parse_json(path.read_bytes(), path, what, duplicates=duplicates, fix=fix)


def type_name(value: Any) -> str:
    """How a JSON value's type reads in an error message."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def is_int(value: Any) -> bool:
    """A JSON integer; ``True`` is an int to Python but not to JSON."""
    return isinstance(value, int) and not isinstance(value, bool)
