"""The search space: our range syntax and mergekit-evolve's genome, checked whole and decoded to recipes."""

from __future__ import annotations

import pytest
import yaml

from mergesmith.errors import InputError
from mergesmith.recipe import load_recipe
from mergesmith.search.space import load_space, space_problems


def _space(base, variants, **extra):
    raw = {"merge_method": {"choice": ["ties", "task_arithmetic"]}, "base_model": str(base),
           "models": [{"model": str(variants[0]),
                       "parameters": {"weight": {"range": [0, 1]}, "density": {"range": [0.2, 1]}}},
                      {"model": str(variants[1]), "include": {"choice": [True, False]},
                       "parameters": {"weight": {"range": [0, 2]}, "density": 0.5}}],
           "parameters": {"normalize": True}, "tasks": ["a.jsonl", {"name": "b.jsonl", "weight": 2}]}
    raw.update(extra)
    return raw


def test_genes_decode_to_plain_recipes(model_family):
    base, variants = model_family("llama", 3)
    space = load_space(_space(base, variants))
    assert [g.name for g in space.genes] == ["merge_method", "ft0.weight", "ft0.density", "ft1.include",
                                             "ft1.weight"]
    assert [(t.name, t.weight) for t in space.tasks] == [("a.jsonl", 1.0), ("b.jsonl", 2.0)]
    # u = 0.25 -> ties (first half), 0.25 of [0, 1], 0.2 + 0.25 * 0.8, include true (first half), 0.5 of [0, 2]
    values = space.decode([0.25, 0.25, 0.25, 0.25, 0.25])
    assert values == {"merge_method": "ties", "ft0.weight": 0.25, "ft0.density": pytest.approx(0.4),
                      "ft1.include": True, "ft1.weight": 0.5}
    recipe = space.recipe(values)
    assert recipe["merge_method"] == "ties" and "tasks" not in recipe
    assert recipe["models"][1] == {"model": str(variants[1]), "parameters": {"weight": 0.5, "density": 0.5}}
    load_recipe(recipe)  # a valid recipe
    # task_arithmetic declares density too, so it stays; a dropped model leaves the recipe.
    other = space.recipe(space.decode([0.75, 1.0, 0.0, 0.75, 0.0]))
    assert other["merge_method"] == "task_arithmetic"
    assert [m["model"] for m in other["models"]] == [str(variants[0])]
    assert other["models"][0]["parameters"] == {"weight": 1.0, "density": 0.2}
    assert space_problems(space) == []


def test_parameters_a_method_lacks_are_left_out(model_family):
    base, variants = model_family("llama", 3)
    raw = {"merge_method": {"choice": ["linear", "ties"]}, "base_model": str(base),
           "models": [{"model": str(v), "parameters": {"weight": {"range": [0, 1]}, "density": {"range": [0.5, 1]}}}
                      for v in variants[:2]], "parameters": {"normalize": True, "lambda": {"range": [0.5, 1.5]}}}
    space = load_space(raw)
    linear = space.recipe(space.decode([0.1] + [0.5] * (space.dim - 1)))
    assert linear["merge_method"] == "linear"
    assert linear["models"][0]["parameters"] == {"weight": 0.5} and linear["parameters"] == {"normalize": True}
    ties = space.recipe(space.decode([0.9] + [0.5] * (space.dim - 1)))
    assert ties["parameters"] == {"normalize": True, "lambda": 1.0}


def test_model_selection_always_keeps_one_model(model_family):
    base, variants = model_family("llama", 3)
    raw = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(v), "include": {"choice": [True, False]}, "parameters": {"weight": 0.5}}
                      for v in variants]}
    space = load_space(raw)
    values = space.decode([0.9, 0.7, 0.95])  # every model dropped: the most nearly kept one returns
    assert [values[g.name] for g in space.genes] == [False, False, True]
    assert [m["model"] for m in space.recipe(values)["models"]] == [str(variants[2])]


def test_layer_groups_make_one_gene_per_group_as_a_gradient(model_family):
    base, variants = model_family("llama", 3)
    raw = {"merge_method": "task_arithmetic", "base_model": str(base), "layer_groups": 3,
           "models": [{"model": str(variants[0]), "parameters": {"weight": {"range": [0, 1]}}}]}
    space = load_space(raw)
    assert [g.name for g in space.genes] == ["ft0.weight@0", "ft0.weight@1", "ft0.weight@2"]
    assert space.recipe(space.decode([0.0, 0.5, 1.0]))["models"][0]["parameters"]["weight"] == [0.0, 0.5, 1.0]


def test_every_problem_of_a_space_is_reported_at_once(tmp_path, model_family):
    base, variants = model_family("llama", 3)
    raw = {"merge_method": {"choice": ["ties", "no_such_method"]}, "base_model": {"range": [0, 1]},
           "models": [{"model": str(variants[0]), "parameters": {"weight": {"range": [1, 0]},
                                                                "density": {"range": [0, 1]},
                                                                "colour": {"range": [0, 1]}}}],
           "layer_groups": 0, "surprise": 1}
    with pytest.raises(InputError) as err:
        load_space(raw)
    text = "\n".join(err.value.problems)
    for expected in ("unknown key 'surprise'", "layer_groups = 0", "base_model: ranges and choices are searched only",
                     "weight: range = [1, 0]: low must be below high", "no_such_method",
                     "density: range = [0, 1] leaves density's bounds (0.0, 1.0]",
                     "no method of ['ties'] has a parameter 'colour'"):
        assert expected in text, expected
    # Models are opened by the recipe check: a missing folder is named before any search starts.
    ok = load_space({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "missing"), "parameters": {"weight": {"range": [0, 1]}}},
        {"model": str(variants[0]), "parameters": {"weight": 1.0}}]})
    assert any("missing: no such model folder" in p for p in space_problems(ok))


def test_a_mergekit_evolve_config_is_accepted(tmp_path, model_family):
    base, variants = model_family("llama", 3)
    config = {"genome": {"models": [str(v) for v in variants[:2]], "merge_method": "ties",
                         "base_model": str(base), "layer_granularity": 0, "filters": ["self_attn"],
                         "normalize": False, "allow_negative_weights": True, "smooth": False},
              "tasks": [{"name": "val.jsonl", "weight": 0.5}, "other.jsonl"], "limit": 12, "num_fewshot": 0}
    path = tmp_path / "evol.yml"
    path.write_text(yaml.safe_dump(config))
    space = load_space(path)
    # 2 models x (1 filter + the rest) x (weight, density)
    assert len(space.genes) == 8 and space.limit == 12
    assert [t.weight for t in space.tasks] == [0.5, 1.0]
    assert any("num_fewshot" in n for n in space.notes)
    recipe = space.recipe(space.decode([0.0] * 8))
    assert recipe["parameters"] == {"normalize": False}
    assert recipe["models"][0]["parameters"]["weight"] == [{"filter": "self_attn", "value": -1.0}, {"value": -1.0}]
    assert recipe["models"][0]["parameters"]["density"][1] == {"value": 0.05}
    load_recipe(recipe)
    assert space_problems(space) == []


def test_genome_layer_granularity_gives_slices_or_gradients(model_family):
    base, variants = model_family("llama", 3)  # 3 layers
    genome = {"models": [str(v) for v in variants[:2]], "merge_method": "task_arithmetic", "base_model": str(base),
              "layer_granularity": 1}
    space = load_space({"genome": genome, "tasks": ["x.jsonl"]})
    recipe = space.recipe(space.decode([0.5] * space.dim))
    assert space.dim == 6 and len(recipe["slices"]) == 3
    assert [s["layer_range"] for s in recipe["slices"][1]["sources"]] == [[1, 2], [1, 2], [1, 2]]
    assert recipe["slices"][1]["sources"][2] == {"model": str(base), "layer_range": [1, 2]}
    assert space_problems(space) == []
    smooth = load_space({"genome": {**genome, "smooth": True}, "tasks": ["x.jsonl"]})
    assert smooth.recipe(smooth.decode([0.0, 0.5, 1.0, 0, 0, 0]))["models"][0]["parameters"]["weight"] == [0, 0.5, 1]


def test_genome_problems_are_listed_together(model_family):
    base, variants = model_family("llama", 3)
    with pytest.raises(InputError) as err:
        load_space({"genome": {"models": [str(variants[0])], "merge_method": "slerp", "colour": 1},
                    "tasks": ["x.jsonl"], "extra": True})
    text = "\n".join(err.value.problems)
    assert "slerp genomes are not supported yet" in text and "genome.colour" in text and "'extra'" in text
    with pytest.raises(InputError, match="base_model is required for ties"):
        load_space({"genome": {"models": [str(variants[0])], "merge_method": "ties"}, "tasks": ["x"]})


def test_methods_that_need_statistics_are_refused_up_front(model_family):
    base, variants = model_family("llama", 3)
    with pytest.raises(InputError) as err:
        load_space({"merge_method": {"choice": ["ties", "regmean", "dam"]}, "base_model": str(base),
                    "models": [{"model": str(variants[0]), "parameters": {"weight": {"range": [0, 1]}}}]})
    assert err.value.problems == [
        f"space: merge_method {m} needs calibration statistics, which search does not support yet; offer another "
        "method" for m in ("regmean", "dam")]


def test_a_space_whose_candidates_could_not_run_is_refused(tmp_path, model_family):
    """Issue 20: every candidate is built from the output config and run; a model_type transformers does
    not know failed there (exit 1) and now is a problem of the space, found before any search."""
    from tiny_models import with_model_type

    base, variants = model_family("llama", 3)
    odd = [with_model_type(m, tmp_path / m.name) for m in (base, variants[0])]
    space = load_space({"merge_method": "task_arithmetic", "base_model": str(odd[0]),
                        "models": [{"model": str(odd[1]), "parameters": {"weight": {"range": [0, 1]}}}]})
    assert [p for p in space_problems(space) if "model_type 'fancy_llm'" in p and "trust_remote_code" in p]


@pytest.mark.parametrize("raw, expected", [
    # each of these ended in a TypeError (exit 1)
    ({"merge_method": {"range": [0, 1]}, "models": [{"model": "a", "parameters": {"weight": 1.0}}]},
     "space: merge_method: range searches numbers; give choice: a list of method names"),
    ({"merge_method": "linear", "models": 3, "parameters": {"weight": {"range": [0, 1]}}},
     "space: models Input should be a valid list"),
    ({"genome": {"models": ["a"], "merge_method": ["ties"]}},
     "space: genome.merge_method = ['ties'] must be one of linear"),
    ({"genome": {"models": ["a"], "merge_method": {"ties": 1}}},
     "space: genome.merge_method = {'ties': 1} must be one of linear"),
    # a range for include decoded to a number, taken as true or false by its truthiness
    ({"merge_method": "linear", "models": [{"model": "a", "include": {"range": [0, 1]},
                                            "parameters": {"weight": 1.0}}]},
     "space: models[0].include: range searches numbers; give choice: [true, false]"),
    ({"genome": {"models": ["a"], "merge_method": "ties", "base_model": ["b"]}},
     "space: genome.base_model = ['b'] must be a model path"),
])
def test_a_malformed_space_is_an_input_error(raw, expected):
    """Issue 20, found by generating spaces: a space's wrong types are problems of the space."""
    with pytest.raises(InputError) as err:
        space = load_space(raw)
        problems = space_problems(space)
        if problems:
            raise InputError(problems)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
    assert not any("must be a method name" in p for p in err.value.problems)  # not said twice
