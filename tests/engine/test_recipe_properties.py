"""Recipe shapes, generated (issue 20): a bad recipe is one InputError before any weight is read,
never another exception; a good one plans.

Recipes come in three kinds. ``any_recipe`` draws every field from well-formed and malformed values
alike (scalars, gradients, filter lists, empty lists, nested scopes, wrong types, values out of
range, unknown fields); most stop at the schema. ``good_recipe`` builds a valid recipe for a method
from its parameter declarations alone, in either form (``models:`` or ``slices:``) and with each
parameter set as a scalar, a gradient or a filter list at any scope that holds it.
``broken_recipe`` is a good one after one to three edits (a setting replaced by any shape, a field
or model reference broken, another method), so that it gets as far as planning. The tiny models
are shared and never read: a weight read fails the test.
"""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.api import plan_merge
from mergesmith.engine import MergeOptions
from mergesmith.errors import InputError
from mergesmith.methods import BasePolicy, Param, all_methods

METHODS = all_methods()
PARAM_NAMES = sorted({p.name for m in METHODS.values() for p in m.params})
LAYERS = 3
# Parts of the tiny Llama's tensor names (and one that names none).
FILTERS = ["mlp", "self_attn", "layers.1.", "embed", "norm", "lm_head", "no_such_tensor"]


@pytest.fixture(scope="module")
def world(model_family, tmp_path_factory):
    """The models (base first), a folder that is no model, the calibration data, and no weight reads."""
    base, variants = model_family("llama", 3)
    root = tmp_path_factory.mktemp("recipe-properties")
    data = root / "cal.jsonl"
    data.write_text('{"id": "g0", "type": "generation", "prompt": "t3 t4 t5", "references": ["t6"]}\n')

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read while a recipe was checked or planned")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "read", no_reading)
        patch.setattr(Checkpoint, "read_rows", no_reading)
        yield {"models": [str(base)] + [str(v) for v in variants], "missing": str(root / "missing"),
               "calibration": {"files": [str(data)], "samples": 4, "max_length": 8, "cache_dir": str(root / "cache")}}


def plan(recipe: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown fields, ignored parameters, unusual values
        result = plan_merge(recipe, MergeOptions(progress=False))
    for m in result.models:
        m.checkpoint.close()
    return result


def plans_or_is_one_input_error(recipe: dict) -> None:
    """Any other exception fails the test (the CLI's exit 1), and so does a weight read (``world``)."""
    try:
        plan(recipe)
    except InputError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


# ----------------------------------------------------------------------------- any recipe

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=4), st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                           st.integers(), max_size=1))
scalars = st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 1.0, 1.5, -0.1, 1e9, math.nan, math.inf]),
                    st.integers(-2, 12), st.booleans(), st.sampled_from(["0.5", "nan", "true", "vertical", "x", ""]),
                    st.none())
filters = st.one_of(st.sampled_from(FILTERS + ["*", ""]), st.none(), st.integers(0, 3), st.lists(st.just("mlp"),
                                                                                                    max_size=1))


def _conditional(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({"value": values}, optional={"filter": filters})


settings_shapes = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), _conditional(inner),
                            st.lists(_conditional(inner), max_size=3),
                            st.fixed_dictionaries({"filter": filters}, optional={"colour": inner})),
    max_leaves=8)
parameter_maps = st.one_of(
    st.dictionaries(st.sampled_from(PARAM_NAMES + ["colour"]), settings_shapes, max_size=4),
    st.dictionaries(st.integers(0, 2), scalars, max_size=1),
    junk)


@st.composite
def any_recipe(draw, world: dict) -> dict:
    refs = st.one_of(st.sampled_from(world["models"] + [world["missing"]]), junk,
                     st.sampled_from(world["models"]).map(lambda p: {"model": {"path": p}}))
    model = st.fixed_dictionaries({"model": refs}, optional={
        "parameters": parameter_maps, "calibration": st.one_of(junk, st.just({"files": []})), "colour": junk})
    layer_range = st.one_of(st.lists(st.integers(-1, LAYERS + 1), min_size=0, max_size=3), junk)
    source = st.fixed_dictionaries({"model": refs, "layer_range": layer_range}, optional={"parameters": parameter_maps})
    a_slice = st.fixed_dictionaries({"sources": st.one_of(st.lists(source, max_size=3), junk)}, optional={
        "parameters": parameter_maps, "base_model": refs, "residual_weight": junk})
    calibration = st.one_of(junk, st.just(world["calibration"]), st.fixed_dictionaries({}, optional={
        "files": st.one_of(st.just(world["calibration"]["files"]), junk), "samples": st.integers(-1, 3),
        "memory": st.one_of(st.sampled_from(["auto", "1KiB", "lots", "0"]), junk), "include_answers": junk}))
    method = st.one_of(st.sampled_from(sorted(METHODS)), st.sampled_from(["tie", ""]), junk)
    return draw(st.fixed_dictionaries({"merge_method": method}, optional={
        "base_model": refs, "models": st.one_of(st.lists(model, max_size=4), junk),
        "slices": st.one_of(st.lists(a_slice, max_size=2), junk), "parameters": parameter_maps,
        "dtype": st.one_of(st.sampled_from(["float32", "bf16", "fp8"]), junk),
        "tokenizer_source": st.one_of(st.sampled_from(["base", "union"] + world["models"][:1]), junk),
        "tokenizer": st.one_of(st.just({"source": "base"}), junk), "random_seed": junk, "calibration": calibration,
        "chat_template": junk, "modules": junk}))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_recipe_plans_or_is_one_input_error_before_any_weight(world, data):
    plans_or_is_one_input_error(data.draw(any_recipe(world)))


# ----------------------------------------------------------------------------- good recipes

# Ranges within a parameter's bounds that also keep a method's joint checks quiet: positive weights
# (normalize divides by their sum), della's keep probabilities density +- epsilon within [0, 1],
# consensus_k at most the number of models besides the base.
SAFE = {("della", "density"): (0.4, 0.6), ("della", "epsilon"): (0.0, 0.3),
        ("della_linear", "density"): (0.4, 0.6), ("della_linear", "epsilon"): (0.0, 0.3)}


def valid_values(method: str, param: Param) -> st.SearchStrategy:
    if param.kind is bool:
        return st.booleans()
    if param.kind is str:
        return st.sampled_from(param.choices)
    if param.kind is int:
        high = 1 if param.name == "consensus_k" else 5
        return st.integers(int(param.low or 0), high)
    low, high = SAFE.get((method, param.name)) or param.usual or (param.low or 0.1, param.high or 2.0)
    low = max(low, 0.1) if param.name == "weight" or param.low_open else low
    high = high - 0.01 if param.high_open else high
    return st.floats(low, high)


def valid_setting(method: str, param: Param) -> st.SearchStrategy:
    value = valid_values(method, param)
    gradient = st.lists(value, min_size=1, max_size=4)
    choice = st.one_of(value, gradient)
    filtered = st.tuples(st.lists(st.tuples(st.sampled_from(FILTERS), choice), max_size=2), choice).map(
        lambda parts: [{"filter": f, "value": v} for f, v in parts[0]] + [{"value": parts[1]}])
    return st.one_of(value, gradient, filtered, choice.map(lambda v: {"value": v}))


PLANNABLE = sorted(name for name, m in METHODS.items() if not any(p.stats_file for p in m.params))


@st.composite
def good_recipe(draw, world: dict) -> dict:
    name = draw(st.sampled_from(PLANNABLE))
    method = METHODS[name]
    base, *variants = world["models"]
    most = min(method.max_models or len(variants), len(variants))
    least = max(method.min_models, 2 if method.param("consensus_k") else 1)  # its default k is 2
    others = draw(st.permutations(variants))[:draw(st.integers(least, most))]
    with_base = method.base is BasePolicy.REQUIRED or (method.base is BasePolicy.OPTIONAL and draw(st.booleans()))
    if method.passthrough:
        lo = draw(st.integers(0, LAYERS - 1))
        hi = draw(st.integers(lo + 1, LAYERS))
        recipe = {"merge_method": name, "slices": [{"sources": [{"model": m, "layer_range": [lo, hi]}]}
                                                   for m in draw(st.lists(st.sampled_from(world["models"]),
                                                                          min_size=1, max_size=3))]}
        sources = [sl["sources"][0] for sl in recipe["slices"]]
        scopes = recipe["slices"]
    else:
        inputs = ([base] if with_base else []) + others
        if draw(st.booleans()):
            lo = draw(st.integers(0, LAYERS - 1))
            hi = draw(st.integers(lo + 1, LAYERS))
            sources = [{"model": m, "layer_range": [lo, hi]} for m in inputs]
            recipe = {"merge_method": name, "slices": [{"sources": sources}]}
            scopes = recipe["slices"]
        else:
            sources = [{"model": m} for m in inputs]
            recipe = {"merge_method": name, "models": sources}
            scopes = []
        if with_base:
            recipe["base_model"] = base
    if method.needs_stats:
        recipe["calibration"] = dict(world["calibration"])
    for param in method.params:
        at = ["global", "slice"] if scopes else ["global"]
        at += ["models"] if param.per_model else []
        where = draw(st.sampled_from(at + ([] if param.required else ["default"])))
        if where == "global":
            recipe.setdefault("parameters", {})[param.name] = draw(valid_setting(name, param))
        elif where == "slice":
            for sl in scopes:
                sl.setdefault("parameters", {})[param.name] = draw(valid_setting(name, param))
        elif where == "models":
            for src in sources:
                src.setdefault("parameters", {})[param.name] = draw(valid_setting(name, param))
    return recipe


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_good_recipe_plans_every_tensor_with_every_parameter(world, data):
    recipe = data.draw(good_recipe(world))
    result = plan(recipe)
    method = METHODS[recipe["merge_method"]]
    assert result.tensors
    for task in result.tensors:
        assert set(task.params) == {p.name for p in method.params if not p.per_model}
        for k, values in enumerate(task.model_params):
            expected = {p.name for p in method.params if p.per_model and (k != task.base_index or p.on_base)}
            assert set(values) == expected


# ----------------------------------------------------------------------------- good recipes, broken a little


def _dicts(value: object) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _holders(recipe: dict) -> list[dict]:
    """Every mapping that may hold ``parameters``: the recipe, its slices, their sources, its models
    (whatever earlier edits left of them)."""
    slices = _dicts(recipe.get("slices"))
    return [recipe, *slices, *(src for sl in slices for src in _dicts(sl.get("sources"))),
            *_dicts(recipe.get("models"))]


@st.composite
def broken_recipe(draw, world: dict) -> dict:
    recipe = draw(good_recipe(world))
    method = METHODS[recipe["merge_method"]]
    names = [p.name for p in method.params] * 3 + PARAM_NAMES + ["colour"]
    base = world["models"][0]
    refs = st.one_of(st.sampled_from(world["models"] + [world["missing"], f"{base}+{world['missing']}",
                                                        f"{base}+{world['models'][1]}"]), junk)
    calibration = st.fixed_dictionaries({"files": st.one_of(st.just(world["calibration"]["files"]), junk)}, optional={
        "samples": st.one_of(st.integers(-1, 3), junk), "memory": st.one_of(st.sampled_from(["auto", "1KiB", "0"]),
                                                                             junk),
        "include_answers": junk, "cache_dir": st.just(world["calibration"]["cache_dir"])})
    fields = {"base_model": refs, "dtype": st.one_of(st.sampled_from(["bfloat16", "fp8"]), junk),
              "out_dtype": st.one_of(st.sampled_from(["float16", "int8"]), junk),
              "tokenizer_source": st.one_of(st.sampled_from(["base", "union"]), refs),
              "tokenizer": st.one_of(st.fixed_dictionaries({"source": refs}), junk),
              "random_seed": junk, "calibration": st.one_of(calibration, junk), "chat_template": junk,
              "slices": junk, "models": junk, "modules": junk, "name": junk}
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["set", "drop", "model", "layers", "method", "field", "scope"]))
        holder = draw(st.sampled_from(_holders(recipe)))
        if edit == "set" and isinstance(holder.get("parameters", {}), dict):
            holder.setdefault("parameters", {})[draw(st.sampled_from(names))] = draw(settings_shapes)
        elif edit == "drop" and isinstance(holder.get("parameters"), dict) and holder["parameters"]:
            del holder["parameters"][draw(st.sampled_from(sorted(holder["parameters"])))]
        elif edit == "model" and holder is not recipe:
            holder["model"] = draw(refs)
        elif edit == "layers" and "layer_range" in holder:
            holder["layer_range"] = draw(st.one_of(st.lists(st.integers(-1, LAYERS + 2), max_size=3), junk))
        elif edit == "method":
            recipe["merge_method"] = draw(st.sampled_from(sorted(METHODS)))
        elif edit == "field":
            name = draw(st.sampled_from(sorted(fields)))
            recipe[name] = draw(fields[name])
        elif edit == "scope" and holder is not recipe:
            key = draw(st.sampled_from(["calibration", "residual_weight", "base_model", "colour"]))
            holder[key] = draw(st.one_of(st.just({"files": world["calibration"]["files"]}), refs))
    return recipe


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_a_broken_recipe_plans_or_is_one_input_error_before_any_weight(world, data):
    plans_or_is_one_input_error(data.draw(broken_recipe(world)))
