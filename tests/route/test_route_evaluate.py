"""A routed model used like a model: fallback, generation, resident models, adapters, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from route_data import write_recipe, write_task

from mergesmith.cli import main
from mergesmith.evaluate import evaluate
from mergesmith.route import routers
from mergesmith.route.build import build_routed


def test_best_threshold_by_hand():
    # confidences 0.2, 0.5, 0.9: the fallback is right on the first two, the expert on the last
    assert routers.best_threshold([0.2, 0.5, 0.9], [0, 0, 1], [1, 1, 0]) == pytest.approx(0.5, abs=1e-6)
    assert routers.best_threshold([0.2, 0.5, 0.9], [1, 1, 1], [0, 0, 0]) == -math.inf
    # a tie in confidence moves both items together
    assert routers.best_threshold([0.3, 0.3], [0, 1], [1, 0]) == -math.inf


def test_router_math_by_hand():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    centroids = routers.fit_centroids(feats, torch.tensor([0, 0, 1]), 2)
    assert centroids.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    scores = routers.centroid_scores(torch.tensor([[1.0, 1.0], [0.0, -1.0]]), centroids)
    assert torch.allclose(scores, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]))
    assert routers.choose(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), 0.7) == ([0, -1], pytest.approx([0.9, 0.6]))
    clf = routers.fit_classifier(feats, torch.tensor([0, 0, 1]), 2)
    assert routers.classifier_scores(feats, clf).argmax(-1).tolist() == [0, 0, 1]
    assert routers.perplexity_scores(torch.tensor([[2.0, 1.0]])).argmax(-1).tolist() == [1]


def test_fallback_threshold_is_chosen_on_validation_and_used(models, files, tmp_path):
    recipe = write_recipe(tmp_path / "route.yml", models, files, "classifier",
                          fallback={"model": str(models["merged"]), "threshold": "auto",
                                    "validation": [str(files["val_a"]), str(files["val_b"])]})
    routed = build_routed(recipe, tmp_path / "routed")
    assert routed.threshold is None or 0 <= routed.threshold <= 1
    fixed = write_recipe(tmp_path / "fixed.yml", models, files, "classifier",
                         fallback={"model": str(models["merged"]), "threshold": 1.5})
    build_routed(fixed, tmp_path / "always")  # a probability never reaches 1.5: everything falls back
    result = evaluate(tmp_path / "always", [files["val_a"], files["val_b"]], bootstrap=0, progress=False)
    assert {p.expert for p in result.predictions} == {"fallback"}
    alone = evaluate(models["merged"], [files["val_a"], files["val_b"]], bootstrap=0, progress=False)
    assert result.macro == alone.macro


def test_generation_is_routed_and_matches_the_expert(models, files, tmp_path):
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "oracle"), tmp_path / "routed")
    result = evaluate(tmp_path / "routed", [files["gen_a"]], bootstrap=0, progress=False)
    alone = evaluate(models["a"], [files["gen_a"]], bootstrap=0, progress=False)
    assert [p.prediction for p in result.predictions] == [p.prediction for p in alone.predictions]
    assert {p.expert for p in result.predictions} == {"a"}


def test_each_model_is_loaded_once_and_resident_keeps_n(models, files, tmp_path):
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "perplexity"), tmp_path / "routed")
    tasks = [files["val_a"], files["val_b"]]
    one = evaluate(tmp_path / "routed", tasks, bootstrap=0, progress=False, resident=1).settings["routed"]
    both = evaluate(tmp_path / "routed", tasks, bootstrap=0, progress=False, resident=2).settings["routed"]
    answering = len([m for m in ("a", "b") if any(m in s for s in one["share_by_task"].values())])
    # each expert scores every prompt, then answers its share; the last one scoring is still loaded
    last_answers = any("b" in s for s in one["share_by_task"].values())
    assert one["model_loads"] == 2 + answering - last_answers
    assert both["model_loads"] == 2  # kept resident from routing to answering
    centroid = tmp_path / "centroid"
    build_routed(write_recipe(tmp_path / "c.yml", models, files, "centroid"), centroid)
    loads = evaluate(centroid, tasks, bootstrap=0, progress=False).settings["routed"]["loaded"]
    assert len(loads) == len(set(loads)) == 3  # the base for the features, then each expert once


def test_an_adapter_expert_answers_as_the_model_with_the_adapter_folded_in(models, files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(adapter)
    ref = f"{models['base']}+{adapter}"
    recipe = write_recipe(tmp_path / "route.yml", {**models, "b": ref}, files, "oracle")
    build_routed(recipe, tmp_path / "routed")
    routed = evaluate(tmp_path / "routed", [files["val_b"]], bootstrap=0, progress=False)
    alone = evaluate(ref, [files["val_b"]], bootstrap=0, progress=False)
    plain = evaluate(models["base"], [files["val_b"]], bootstrap=0, progress=False)
    assert [p.loglikelihoods for p in routed.predictions] == [p.loglikelihoods for p in alone.predictions]
    assert [p.loglikelihoods for p in alone.predictions] != [p.loglikelihoods for p in plain.predictions]


def test_cli_route_then_evaluate_writes_the_expert_of_each_item(models, files, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "route.yml", models, files, "centroid")
    assert main(["route", str(recipe), str(tmp_path / "routed"), "--no-progress"]) == 0
    assert "centroid router over 2 experts (a, b)" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "routed"), "--tasks", str(files["val_a"]), "--out",
                 str(tmp_path / "eval"), "--bootstrap", "0", "--no-progress", "--resident", "2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {r["expert"] for r in rows} == {"a"}
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["settings"]["routed"]["kind"] == "centroid"
    assert main(["evaluate", str(tmp_path / "routed"), "--tasks", str(files["val_a"]), "--out",
                 str(tmp_path / "eval2"), "--resident", "0"]) == 2


def test_a_task_split_between_experts_keeps_each_items_few_shot_context(models, files, tmp_path):
    rows = [json.loads(x) for f in (files["val_a"], files["val_b"]) for x in f.read_text().splitlines()]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "mixed.yaml"
    config.write_text("task: mixed\ndata: mixed.jsonl\nfewshot: {num: 2, seed: 3}\n")
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "classifier"), tmp_path / "routed")
    routed = evaluate(tmp_path / "routed", [config], bootstrap=0, progress=False)
    assert routed.settings["routed"]["share_by_task"]["mixed"] == {"a": 0.5, "b": 0.5}
    for skill in ("a", "b"):
        alone = {p.id: p.loglikelihoods for p in evaluate(models[skill], [config], bootstrap=0,
                                                            progress=False).predictions}
        mine = [p for p in routed.predictions if p.expert == skill]
        assert mine and all(p.loglikelihoods == alone[p.id] for p in mine)
