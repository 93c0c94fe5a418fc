"""The routing recipe (ROUTE.yml): experts, an optional fallback, the router kind, the data.

```yaml
base_model: zoo/base              # whose features centroid and classifier read
router: {kind: classifier, l2: 0.001, steps: 200}
experts:
  - name: arith                   # default: the model folder's name
    model: zoo/experts/arith      # a folder, or model+adapter as in merge recipes
    data: [data/train/arith.jsonl]  # its example prompts; their task names are its tasks
fallback:                         # optional: answers what the router is unsure of
  model: out/merged
  threshold: auto                 # or a number; auto is chosen on `validation`
  validation: [data/validation/arith.jsonl, data/validation/facts.jsonl]
```

Data files must be train or validation files, never test: see ``looks_like_test``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergesmith.errors import InputError, read_text, read_yaml_mapping
from mergesmith.route.routers import FEATURE_KINDS, KINDS

TEST_WORDS = {"test", "tests", "testing", "heldout"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterSpec(_Strict):
    kind: str
    l2: float = Field(1e-3, ge=0)  # classifier: the weight decay
    steps: int = Field(200, ge=1)  # classifier: L-BFGS iterations


class ExpertSpec(_Strict):
    model: str
    name: Optional[str] = None
    data: list[str] = []
    tasks: list[str] = []


class FallbackSpec(_Strict):
    model: str
    threshold: Union[float, str] = "auto"
    validation: list[str] = []


class RouteRecipe(_Strict):
    experts: list[ExpertSpec]
    router: RouterSpec
    base_model: Optional[str] = None
    fallback: Optional[FallbackSpec] = None
    batch_size: int = Field(8, ge=1)


def looks_like_test(path: Union[str, Path]) -> Optional[str]:
    """Why a data file looks like a test split, or None.

    The rule: the file's name, or the name of its folder or the folder above (the zoo writes
    ``<split>/<mc|gen>/<skill>.jsonl``), split at every non-letter, contains the word test,
    tests, testing or heldout; or the file's items carry no answers (a hidden test set)."""
    p = Path(path)
    for part in [p.stem, p.parent.name, p.parent.parent.name]:
        words = set(re.split(r"[^a-z]+", part.lower()))
        hit = words & TEST_WORDS
        if hit:
            return (f"{path}: looks like a test file ({part!r} contains the word {sorted(hit)[0]!r}); a router is "
                    "fitted on train or validation files only; rename or move the file if it is not a test split")
    return None


def unlabelled_problem(path: str, tasks) -> Optional[str]:
    if tasks and not any(item.labelled for t in tasks for item in t.items):
        return (f"{path}: no item has an answer, as in a hidden test set; a router is fitted on train or "
                "validation files only")
    return None


def is_route_recipe(source: object) -> bool:
    """Whether ``source`` is a YAML file holding a routing recipe (a mapping with router and experts)."""
    if not isinstance(source, (str, Path)) or Path(source).suffix.lower() not in (".yml", ".yaml") \
            or not Path(source).is_file():
        return False
    try:
        raw = yaml.safe_load(read_text(source))
    except (InputError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "router" in raw and "experts" in raw


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_route_recipe(path: Union[str, Path], *, check: bool = True) -> RouteRecipe:
    """The recipe, checked against the schema and (``check``) against itself; every problem raised
    together. Without ``check`` the caller adds ``recipe_problems`` to its own."""
    where = str(path)
    raw, _ = read_yaml_mapping(path, "no such routing recipe",
                               "a routing recipe is a mapping with experts, router and data; see docs/route.md")
    try:
        recipe = RouteRecipe.model_validate(raw)
    except ValidationError as err:
        raise InputError([f"{where}: {_where(e['loc'])}: {e['msg']}" for e in err.errors()]) from None
    problems = recipe_problems(recipe, where) if check else []
    if problems:
        raise InputError(problems)
    return recipe


def expert_names(recipe: RouteRecipe) -> list[str]:
    return [e.name or Path(e.model.split("+")[0]).name for e in recipe.experts]


def recipe_problems(recipe: RouteRecipe, where: str) -> list[str]:
    """What the schema cannot see: the kind, names, which data each kind needs, test-looking files."""
    problems = []
    kind = recipe.router.kind
    if kind not in KINDS:
        problems.append(f"{where}: router.kind {kind!r} is not known; use one of {', '.join(KINDS)}")
    if len(recipe.experts) < 2:
        problems.append(f"{where}: experts: give at least two experts to route between")
    names = expert_names(recipe)
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: experts: the name {name!r} is used twice; give each expert its own name")
    if kind in FEATURE_KINDS:
        if recipe.base_model is None:
            problems.append(f"{where}: base_model: the {kind} router reads the base model's features; name it")
        for k, e in enumerate(recipe.experts):
            if not e.data:
                problems.append(f"{where}: experts[{k}].data: the {kind} router is fitted on each expert's example "
                                "prompts; give at least one train or validation task file")
    fb = recipe.fallback
    if kind == "oracle" and fb is not None and (fb.threshold != "auto" or fb.validation):
        problems.append(f"{where}: fallback: the oracle sends a task no expert names to the fallback and has no "
                        "confidence to cut; leave out threshold and validation")
    elif fb is not None and kind != "oracle":
        if isinstance(fb.threshold, str) and fb.threshold != "auto":
            problems.append(f"{where}: fallback.threshold {fb.threshold!r}: give a number or auto")
        if fb.threshold == "auto" and not fb.validation:
            problems.append(f"{where}: fallback.validation: threshold auto is chosen on validation task files; "
                            "give them, or a number as the threshold")
    files = [(f"experts[{k}].data", f) for k, e in enumerate(recipe.experts) for f in e.data]
    files += [("fallback.validation", f) for f in (fb.validation if fb else [])]
    for field, f in files:
        why = looks_like_test(f)
        if why:
            problems.append(f"{where}: {field}: {why}")
        elif not Path(f).is_file():
            problems.append(f"{where}: {field}: {f}: no such task file")
    return problems
