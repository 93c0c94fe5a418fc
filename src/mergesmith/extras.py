"""Optional dependencies: found missing before any work, named with the extra to install.

``pip install mergesmith`` gives the merge engine; the extras add what some
commands need (``pyproject.toml``, ``[project.optional-dependencies]``). A command
calls ``require_extras`` first thing, so that a missing package is one clear
error at the start, not a ``ModuleNotFoundError`` after minutes of training.
"""

from __future__ import annotations

from importlib.util import find_spec

from mergesmith.errors import InputError

# extra -> {import name: distribution name}, as pyproject.toml declares them
EXTRAS: dict[str, dict[str, str]] = {
    "eval": {"rouge_score": "rouge-score"},
    "zoo": {"peft": "peft", "tokenizers": "tokenizers", "matplotlib": "matplotlib"},
    "search": {"ray": "ray", "cma": "cma", "optuna": "optuna"},
}


def missing_modules(modules: list[str]) -> list[str]:
    """The import names among ``modules`` that cannot be imported here (nothing is imported)."""
    absent = []
    for name in modules:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install: as good as missing
            found = False
        if not found:
            absent.append(name)
    return absent


def extra_problems(command: str, extra: str, modules: list[str] | None = None) -> list[str]:
    """Why ``command`` cannot run without ``extra`` (empty: everything is installed).

    ``modules`` narrows the check to the packages this run needs (default: all of the extra's).
    """
    wanted = EXTRAS[extra]
    names = list(wanted) if modules is None else list(modules)
    absent = missing_modules(names)
    if not absent:
        return []
    packages = ", ".join(wanted.get(m, m) for m in absent)
    return [f"{command} needs the optional package{'s' if len(absent) > 1 else ''} {packages}, "
            f"not installed here: pip install 'mergesmith[{extra}]'"]


def require_extras(command: str, extra: str, modules: list[str] | None = None) -> None:
    """Raise one ``InputError`` naming the missing packages and the extra that brings them."""
    problems = extra_problems(command, extra, modules)
    if problems:
        raise InputError(problems)
