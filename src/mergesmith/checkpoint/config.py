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


def model_type_problem(config: dict, where: "Path | str") -> str | None:
    """Why transformers cannot build the causal language model ``config`` describes from its own
    code, or None.

    mergesmith never runs code from a model folder (no ``trust_remote_code``): a ``model_type``
    the installed transformers does not know (its ``CONFIG_MAPPING``, which also holds types
    registered with ``AutoConfig.register``) would need the folder's code, so it is refused with
    this message before transformers is asked to load anything.
    """
    import transformers

    model_type = config.get("model_type")
    version = f"transformers {transformers.__version__}"
    if not isinstance(model_type, str) or not model_type:
        return (f"{where}: config.json names no model_type, so transformers cannot tell which model to build; "
                f"add the model_type the model was saved with (e.g. llama); {FIX}")
    if model_type not in transformers.CONFIG_MAPPING:
        code = " (its auto_map points at code in the model folder)" if config.get("auto_map") else ""
        return (f"{where}: model_type {model_type!r}{code} is not a model type the installed {version} knows; "
                "mergesmith never runs code from a model folder (no trust_remote_code), so it cannot run this "
                "model: use a model of a type transformers supports, or a transformers release that supports "
                f"{model_type} if it is new")
    if transformers.CONFIG_MAPPING[model_type] not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        return (f"{where}: model_type {model_type!r} has no causal language model in {version} "
                "(AutoModelForCausalLM); mergesmith runs decoder language models, as for text generation")
    return None


def runnable_problems(folder: "Path | str") -> list[str]:
    """``model_type_problem`` of a local model folder, or the problems of its config.json.

    [] for anything else (a hub id, a missing folder): the checks that resolve those name them.
    """
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        return []
    try:
        config = read_config(path / "config.json")
    except InputError as err:
        return err.problems
    problem = model_type_problem(config, path / "config.json")
    return [problem] if problem else []
