"""Parameter resolution: gradients, filters and precedence, hand-computed."""

import pytest

from mergesmith.methods.base import Param
from mergesmith.recipe import resolve_param, resolve_setting

W = Param("weight", float, per_model=True)
FLAG = Param("normalize", bool, True)


def test_gradient_interpolates_linearly_across_layers():
    # [0, 1, 0.5] over t in [0, 1]: t=0.25 sits halfway between 0 and 1; t=0.75 halfway between 1 and 0.5.
    g = [0.0, 1.0, 0.5]
    assert resolve_setting(g, "x", 0.0, W) == 0.0
    assert resolve_setting(g, "x", 0.25, W) == pytest.approx(0.5)
    assert resolve_setting(g, "x", 0.5, W) == pytest.approx(1.0)
    assert resolve_setting(g, "x", 0.75, W) == pytest.approx(0.75)
    assert resolve_setting(g, "x", 1.0, W) == pytest.approx(0.5)


def test_non_numeric_gradient_picks():
    assert resolve_setting([True, False], "x", 0.4, FLAG) is True
    assert resolve_setting([True, False], "x", 1.0, FLAG) is False


def test_first_matching_filter_wins_and_unfiltered_is_fallback():
    s = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": [0.0, 1.0]}]
    assert resolve_setting(s, "model.layers.0.self_attn.q_proj.weight", 0.5, W) == 0.1
    assert resolve_setting(s, "transformer.h.0.attn.c_attn.weight", 0.5, W) == 0.2
    assert resolve_setting(s, "model.layers.0.mlp.up_proj.weight", 0.5, W) == pytest.approx(0.5)
    assert resolve_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0, W) is None


def test_precedence_model_then_slice_then_global_then_default():
    model, sl, glob = {"weight": 3.0}, {"weight": 2.0}, {"weight": 1.0}
    assert resolve_param(W, [model, sl, glob], "x", 0) == 3.0
    assert resolve_param(W, [{}, sl, glob], "x", 0) == 2.0
    assert resolve_param(W, [{}, {}, glob], "x", 0) == 1.0
    # A filter that does not match falls through to the next scope.
    assert resolve_param(W, [{"weight": [{"filter": "mlp", "value": 9.0}]}, {}, glob], "attn", 0) == 1.0
    assert resolve_param(FLAG, [{}, {}], "x", 0) is True
    with pytest.raises(KeyError):
        resolve_param(W, [{}, {}], "x", 0)


def test_embeddings_and_final_norm_take_the_first_gradient_value(tmp_path, model_family):
    """As mergekit: tensors outside the layers sit at t = 0."""
    import mergesmith
    from mergesmith.engine import plan_merge

    _, (a, b, _) = model_family()
    plan = plan_merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": [0.2, 0.8]}}, {"model": str(b), "parameters": {"weight": 1.0}}]})
    by_name = {t.name: t for t in plan.tensors}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert by_name[name].model_params[0]["weight"] == pytest.approx(0.2)
    # Three layers: t = 0, 0.5, 1.
    assert by_name["model.layers.1.mlp.up_proj.weight"].model_params[0]["weight"] == pytest.approx(0.5)
    assert by_name["model.layers.2.mlp.up_proj.weight"].model_params[0]["weight"] == pytest.approx(0.8)
    assert mergesmith.__version__


def test_a_global_parameter_under_a_model_is_a_warning_naming_the_field():
    """Principle 9: mergekit ignores it too, so the recipe keeps loading, but the user is told."""
    from mergesmith.recipe import load_recipe

    recipe = {"merge_method": "ties", "base_model": "b",
              "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5, "normalize": False}}]}
    with pytest.warns(UserWarning, match=r"models\[0\]\.parameters\.normalize is a global parameter of ties"):
        loaded = load_recipe(recipe)
    assert loaded.method.name == "ties"


@pytest.mark.parametrize("setting, expected", [
    ([], "models[0].parameters.weight is an empty list, which gives no value"),
    ([{"filter": "mlp", "value": []}, {"value": 1}], "models[0].parameters.weight[0].value is an empty list"),
    ([0.5, {"filter": "mlp", "value": 1.0}],
     "models[0].parameters.weight mixes values with lists or {filter, value} entries"),
    ([[0.1, 0.2], 0.3], "models[0].parameters.weight mixes values with lists or {filter, value} entries"),
    ({"filter": 3, "value": 1.0}, "models[0].parameters.weight.filter = 3 must be a string"),
    ([{"filter": "mlp", "value": [{"filter": 3, "value": 1.0}]}, {"value": 1}],
     "models[0].parameters.weight[0].value[0].filter = 3 must be a string"),
    ({"filter": "mlp"}, "models[0].parameters.weight is a mapping without value:"),
    (None, "models[0].parameters.weight is empty (null)"),
])
def test_a_setting_planning_could_not_resolve_is_a_recipe_problem(setting, expected):
    """Issue 20: each of these passed the recipe check and then failed in planning with a KeyError,
    AttributeError or TypeError (exit 1); now the recipe check names the field."""
    from mergesmith.errors import InputError
    from mergesmith.recipe import load_recipe

    with pytest.raises(InputError) as err:
        load_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": setting}},
                                                          {"model": "b", "parameters": {"weight": 1.0}}]})
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_a_whole_number_gradient_rounds_half_up():
    """Issue 20: karcher's max_iter: [1, 10] failed planning with 'ValueError: must be a whole number, got
    5.5' (exit 1); a gradient of a whole-number parameter now gives whole numbers."""
    iterations = Param("max_iter", int, 10, low=0)
    assert resolve_setting([1, 10], "x", 0.5, iterations) == 6
    assert resolve_setting([0, 10], "x", 0.25, iterations) == 3
    assert resolve_setting([0, 10], "x", 0.2, iterations) == 2


def test_a_whole_number_gradient_plans(model_family):
    from mergesmith.engine import plan_merge

    _, (a, b, _) = model_family()
    plan = plan_merge({"merge_method": "karcher", "parameters": {"max_iter": [1, 10]},
                       "models": [{"model": str(a)}, {"model": str(b)}]})
    assert [t.params["max_iter"] for t in plan.tensors if ".mlp.up_proj." in t.name] == [1, 6, 10]
