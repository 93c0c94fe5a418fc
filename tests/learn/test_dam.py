"""mergesmith dam: the loss pieces by hand, learning on a tiny family, and the written recipe."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.learn.dam import (
    COEFFICIENTS_FILE, RECIPE_FILE, DamSettings, kl_to_expert, mofo_adamw_step, regularizer, run_dam,
    similarity_penalty,
)
from tiny_models import load_state, with_model_type

def write_calibration(path: Path, n: int, offset: int) -> Path:
    """Prompts over the tiny tokenizer's words t3..t63 (as tests/calibrate/calibration_data.py), one MC row."""
    rows = [{"id": f"g{i}", "type": "generation", "references": ["t9"],
             "prompt": " ".join(f"t{(i * 7 + j * 3 + offset) % 60 + 3}" for j in range(3 + i % 5))} for i in range(n)]
    rows.append({"id": "m0", "type": "multiple_choice", "prompt": "t4 t8 t15", "choices": ["t3", "t5"], "answer": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAST = DamSettings(lr=0.05, epochs=2, samples=8, max_length=16, batch_size=2)


# ----------------------------------------------------------------------------- the loss, by hand


def test_kl_at_temperature_two_by_hand():
    # One sequence of three positions, the last one padding; a vocabulary of two.
    merged = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, -9.0]]])
    expert = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # T = 2: position 0 compares p = softmax([1, 0]) with q = softmax([0, 0]) = (1/2, 1/2);
    # position 1 is identical (KL 0); position 2 is padding.
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl0 = sum(pi * math.log(pi / 0.5) for pi in p)
    expected = 4 * (kl0 + 0.0) / 2  # T² x mean over the two real tokens
    assert kl_to_expert(merged, expert, mask, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # DAM's form: kl_div(log_softmax(z/T), softmax(t/T), batchmean) * T² / tokens, batch of one.
    dam = torch.nn.functional.kl_div(torch.log_softmax(merged[:, :2] / 2, -1), torch.softmax(expert[:, :2] / 2, -1),
                                     reduction="batchmean") * 4 / 2
    assert kl_to_expert(merged, expert, mask, 2.0).item() == pytest.approx(dam.item(), rel=1e-6)


def test_similarity_regularizer_by_hand():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])
    # cos(a, b) = 1/√2, cos(a, c) = 0, cos(b, c) = 1/√2: mean = √2 / 3
    assert similarity_penalty([a, b, c]).item() == pytest.approx(math.sqrt(2) / 3, rel=1e-6)
    assert similarity_penalty([a]).item() == 0.0
    # λ x the sum over layers
    total = regularizer({"l1": [a, b], "l2": [a, c]}, 0.01)
    assert total.item() == pytest.approx(0.01 * (1 / math.sqrt(2) + 0.0), rel=1e-6)


def test_mofo_moves_only_the_largest_momentum_entries():
    p = torch.zeros(10, requires_grad=True)
    p.grad = torch.arange(1.0, 11.0)  # the three largest: entries 7, 8, 9
    mofo_adamw_step([p], {}, 1, lr=0.1, alpha=0.3, weight_decay=0.0)
    moved = (p.detach() != 0).nonzero().flatten().tolist()
    assert moved == [7, 8, 9]
    # the first Adam step moves each chosen entry by lr (m̂ / √v̂ = sign(g))
    assert torch.allclose(p.detach()[7:], torch.full((3,), -0.1), atol=1e-6)


# ----------------------------------------------------------------------------- learning on a tiny family


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_family):
    _, variants = model_family("llama", 2)
    root = tmp_path_factory.mktemp("dam")
    files = [write_calibration(root / f"task{i}.jsonl", n=6, offset=11 * i) for i in range(2)]
    recipe = root / "in.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear",
                                      "models": [{"model": str(v), "parameters": {"weight": 1.0}} for v in variants]}))
    data = {str(v): [str(f)] for v, f in zip(variants, files)}
    return root, recipe, variants, data


@pytest.fixture(scope="module")
def learned(setup):
    root, recipe, _, data = setup
    return run_dam(recipe, data, root / "out", FAST, progress=False, keep_merged=True)


def test_objective_decreases(learned):
    result, _, _ = learned
    assert result.objective_after < result.objective_before
    assert result.kl_after < 0.9 * result.kl_before
    assert len(result.losses) == FAST.epochs * 4  # 7 prompts per expert, batches of 2


def test_written_recipe_reproduces_the_learned_model(learned, tmp_path):
    result, recipe_path, coef_path = learned
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["merge_method"] == "dam" and recipe["parameters"]["coefficients"] == str(coef_path)
    entries = load_file(coef_path)
    # one [in] vector per (linear weight, model): 3 layers x 7 projections + lm_head, two models
    assert len(entries) == 2 * (3 * 7 + 1)
    assert entries["model.layers.0.mlp.down_proj.weight:1"].shape == (32,)
    assert not all(torch.allclose(v, torch.full_like(v, 0.5)) for v in entries.values())  # they did move
    merge(recipe_path, tmp_path / "merged", progress=False)
    streamed = load_state(tmp_path / "merged")
    assert set(result.merged) <= set(streamed)
    for name, tensor in result.merged.items():
        assert torch.equal(streamed[name], tensor), name  # the same float32 operations, in the same order


def test_deterministic_under_a_seed(setup, learned, tmp_path):
    _, recipe, _, data = setup
    again, _, _ = run_dam(recipe, data, tmp_path / "again", FAST, progress=False)
    first = learned[0]
    assert again.losses == first.losses
    assert all(torch.equal(a, b) for a, b in zip(again.flat().values(), first.flat().values()))
    other, _, _ = run_dam(recipe, data, tmp_path / "other", DamSettings(**{**vars(FAST), "seed": 1}), progress=False)
    assert other.losses != first.losses


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments_are_one_input_error_before_work(setup, tmp_path):
    root, recipe, variants, data = setup
    bad = {"nosuchmodel": [str(root / "task0.jsonl")], str(variants[1]): [str(root / "missing.jsonl")]}
    with pytest.raises(InputError) as err:
        run_dam(recipe, bad, tmp_path / "out", DamSettings(lr=-1), progress=False)
    text = str(err.value)
    assert "nosuchmodel is not a model of" in text
    assert "missing.jsonl: no such task file" in text
    assert f"{variants[0]} has no data" in text
    assert "--lr -1 must be > 0" in text
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_recipe_and_exit_2_on_bad_input(setup, tmp_path, capsys):
    root, recipe, variants, data = setup
    # an expert may be named by its folder name when that is unique
    args = ["dam", str(recipe), "--out", str(tmp_path / "o"), "--samples", "4", "--max-length", "8", "--no-progress"]
    args += ["--data", f"{variants[0].name}={data[str(variants[0])][0]}", f"{variants[1]}={data[str(variants[1])][0]}"]
    assert main(args) == 0
    assert (tmp_path / "o" / RECIPE_FILE).is_file() and (tmp_path / "o" / COEFFICIENTS_FILE).is_file()
    assert "objective" in capsys.readouterr().out
    assert main(args) == 2  # the output exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["dam", str(recipe), "--out", str(tmp_path / "p"), "--data", "justaname"]) == 2
    assert "EXPERT=FILE" in capsys.readouterr().err


def test_tied_embeddings_get_no_head_coefficients_and_still_reproduce(model_family, tmp_path):
    _, variants = model_family("llama", 2, tied=True)
    files = [write_calibration(tmp_path / f"t{i}.jsonl", n=2, offset=5 * i) for i in range(2)]
    recipe = {"merge_method": "dam", "models": [{"model": str(v)} for v in variants]}
    result, recipe_path, coef_path = run_dam(recipe, {str(v): [str(f)] for v, f in zip(variants, files)},
                                             tmp_path / "out", DamSettings(lr=0.05, samples=3, max_length=8),
                                             progress=False, keep_merged=True)
    assert "lm_head.weight" not in result.names and len(load_file(coef_path)) == 2 * 3 * 7
    merge(recipe_path, tmp_path / "merged", progress=False)
    streamed = load_state(tmp_path / "merged")
    for name, tensor in result.merged.items():
        assert torch.equal(streamed[name], tensor), name


# ----------------------------------------------------------------------------- distilling on answers


def test_include_answers_distills_on_prompts_and_their_answers(setup, tmp_path):
    from mergesmith.calibrate.data import encode_items, select_items
    from mergesmith.evaluate.model import load_model
    from mergesmith.learn.dam import ExpertData, _calibration, learn_dam

    _, _, variants, data = setup
    settings = DamSettings(epochs=1, samples=3, max_length=16, include_answers=True)
    experts = [ExpertData(k, tuple(data[str(v)])) for k, v in enumerate(variants)]
    result = learn_dam(list(variants), experts, settings, progress=False)
    assert math.isfinite(result.kl_after)
    lm = load_model(variants[0], dtype="float32")
    for e in experts:
        selected = select_items(_calibration(e, settings))
        prompts = [s.ids for s in encode_items(lm, selected, 16)]
        answers = [s.ids for s in encode_items(lm, selected, 16, include_answers=True)]
        assert [s.ids for s in e.sequences] == answers  # what the KL ran on
        assert all(len(a) > len(p) and a[:len(p)] == p for a, p in zip(answers, prompts))


def test_include_answers_needs_labelled_data_before_work(setup, tmp_path):
    _, recipe, variants, data = setup
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"id": "q0", "type": "generation", "prompt": "t4 t5", "references": []}\n')
    bad = {**data, str(variants[1]): [str(unlabelled)]}
    with pytest.raises(InputError, match=rf"--data {variants[1]}: {unlabelled}: 1 of 1 items have no gold answer"):
        run_dam(recipe, bad, tmp_path / "out", DamSettings(include_answers=True), progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["dam", str(recipe), "--out", str(tmp_path / "o"), "--include-answers", "--no-progress",
                 "--data", *(f"{k}={','.join(v)}" for k, v in bad.items())]) == 2


def test_models_it_could_not_run_are_refused_with_the_other_problems(setup, tmp_path):
    """Issue 20: mergesmith never runs code from a model folder; a model_type transformers does not know
    is named with the other argument problems, before any model is loaded."""
    root, _, variants, data = setup
    odd = [with_model_type(v, tmp_path / v.name) for v in variants]
    recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in odd]}
    with pytest.raises(InputError) as err:
        run_dam(recipe, {str(m): files for m, files in zip(odd, data.values())}, tmp_path / "out",
                DamSettings(lr=-1), progress=False)
    found = [p for p in err.value.problems if "model_type 'fancy_llm'" in p and "trust_remote_code" in p]
    assert len(found) == 2 and any("--lr -1" in p for p in err.value.problems)
