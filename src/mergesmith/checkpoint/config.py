"""A model's ``config.json``, read strictly: a JSON object whose key fields have their types.

The engine plans from a few fields (the layer count, the architecture, the
text config of a multimodal model); a wrong type there would otherwise surface
later as a ``TypeError`` deep in planning. Fields that are absent or ``null``
are left to the engine's defaults, as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergesmith.checkpoint.jsonfile import is_int, read_json_file, type_name
from mergesmith.errors import InputError

FIX = "fix config.json or re-download the model"
POSITIVE_INT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "vocab_size", "hidden_size")
STRING_LIST_FIELDS = ("architectures", "layer_types")
STRING_FIELDS = ("model_type", "torch_dtype", "dtype")


def read_config(path: Path) -> dict:
    """The parsed ``config.json`` at ``path``; InputError listing every problem with it."""
    try:
        config = read_json_file(path, "config", fix=FIX)
    except FileNotFoundError:
        raise InputError(f"{path.parent}: no config.json; is it a Hugging Face model folder?") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: the config is {type_name(config)}, not a JSON object; {FIX}")
    problems = config_problems(config, path)
    if problems:
        raise InputError(problems)
    return config


def config_problems(config: dict, path: Path, prefix: str = "") -> list[str]:
    """Every key field of ``config`` (and of its ``text_config``) with the wrong type."""
    problems = []

    def wrong(key: str, value: Any, expected: str) -> None:
        problems.append(f"{path}: {prefix}{key} = {_show(value)} ({type_name(value)}) must be {expected}; {FIX}")

    for key in POSITIVE_INT_FIELDS:
        value = config.get(key)
        if value is not None and not (is_int(value) and value > 0):
            wrong(key, value, "a positive integer")
    for key in STRING_LIST_FIELDS:
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            wrong(key, value, "a list of strings")
    for key in STRING_FIELDS:
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            wrong(key, value, "a string")
    text = config.get("text_config")
    if text is not None:
        if isinstance(text, dict):
            problems.extend(config_problems(text, path, f"{prefix}text_config."))
        else:
            wrong("text_config", text, "an object")
    return problems


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
