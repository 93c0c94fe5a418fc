"""AdaMerging (mergesmith adamerge) on tiny Llama families: the objective, the written recipe, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

import mergesmith
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.learn import adamerging
from mergesmith.learn.adamerging import (AdaMergingSettings, adamerge, batch_entropies, encode_prompts, entropy,
                                         merged_parameters, objective)
from learn_data import write_prompts
from tiny_models import load_state, make_model, with_model_type

FAST = dict(steps=6, lr=0.05, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A 4-layer base (t = i/3 is not exact in binary) and two fine-tunes far enough apart to matter."""
    root = tmp_path_factory.mktemp("adamerge")
    base = make_model(root / "base", seed=0, layers=4)
    tuned = [make_model(root / f"ft{i}", seed=i + 1, base=base, layers=4, noise=0.3) for i in range(2)]
    return root, base, tuned


def write_recipe(path: Path, base: Path, tuned: list[Path], method: str = "task_arithmetic", **extra) -> Path:
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(base)}] + [{"model": str(m), "parameters": {"weight": 1.0}} for m in tuned]}
    recipe.update(extra)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the entropy


def test_entropy_by_hand():
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335...
    two = entropy(torch.tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(two, torch.tensor([0.25 * math.log(4) + 0.75 * math.log(4 / 3)]))
    assert abs(float(two) - 0.5623351446) < 1e-6
    uniform = entropy(torch.zeros(2, 5))  # ln 5 for each row
    torch.testing.assert_close(uniform, torch.full((2,), math.log(5)))
    assert float(entropy(torch.tensor([0.0, -1e4]))) == pytest.approx(0.0, abs=1e-6)  # a certain prediction


def test_choice_entropy_is_over_the_harness_log_likelihoods(tmp_path, family):
    """The multiple-choice entropy is that of softmax(score_mc's log-likelihoods); the generation one that
    of the next-token distribution after the prompt."""
    from mergesmith.evaluate.model import load_model
    from mergesmith.evaluate.scoring import score_mc

    _, base, _ = family
    lm = load_model(str(base))
    tasks = encode_prompts(lm, [str(write_prompts(tmp_path / "p.jsonl"))], AdaMergingSettings())
    choice = next(t for t in tasks if t.name.endswith("multiple_choice"))
    scores = score_mc(lm, choice.units, strategy="shared_prefix")
    expected = [entropy(torch.tensor(scores[r.index].loglikelihoods)) for r in choice.units]
    torch.testing.assert_close(batch_entropies(lm, choice.units), torch.stack(expected), rtol=1e-5, atol=1e-5)

    prompts = next(t for t in tasks if t.name.endswith("generation"))
    with torch.no_grad():
        for request, value in zip(prompts.units, batch_entropies(lm, prompts.units)):
            logits = lm.model(input_ids=torch.tensor([request.prompt])).logits[0, -1]
            p = torch.softmax(logits, -1)
            torch.testing.assert_close(value, -(p * p.log()).sum(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- learning and the recipe


@pytest.fixture(scope="module")
def learned(family):
    """One layer-wise task_arithmetic run and one --prune (ties) run, shared by the tests below."""
    root, base, tuned = family
    data = write_prompts(root / "prompts.jsonl")
    out = {}
    for method, prune in (("task_arithmetic", False), ("ties", True)):
        extra = {"parameters": {"density": 0.5}} if prune else {}
        recipe = write_recipe(root / f"{method}.yml", base, tuned, method, **extra)
        settings = AdaMergingSettings(prune=prune, **FAST)
        out[method] = adamerge(recipe, [str(data)], root / f"learned-{method}.yml", settings, plot=False)
    return root, data, out


def test_the_objective_decreases(learned):
    _, _, results = learned
    for result in results.values():
        assert result.objective_after < result.objective_before - 0.1
        assert result.losses[-1] < result.losses[0]
        assert not torch.allclose(result.lambdas, torch.full_like(result.lambdas, 0.3))  # something was learned


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_learned_recipe_reproduces_the_learned_model(learned, method):
    """mergesmith merge on the written recipe gives the model the coefficients were learned on:
    every tensor to float32 rounding (ties exactly), and the same objective when evaluated from disk."""
    from mergesmith.evaluate.model import load_model

    root, data, results = learned
    result = results[method]
    recipe = root / f"learned-{method}.yml"
    mergesmith.merge(recipe, root / f"merged-{method}", progress=False)
    merged = load_state(root / f"merged-{method}")
    in_memory = {n: t.detach() for n, t in merged_parameters(result.vectors, result.lambdas).items()}
    assert set(in_memory) <= set(merged)
    for name, tensor in in_memory.items():
        # The engine adds with a fused multiply-add (one rounding), we multiply then add (two).
        torch.testing.assert_close(merged[name], tensor, rtol=2e-7, atol=2e-7)
        if method == "ties":
            assert torch.equal(merged[name], tensor)
    # The learned coefficients differ per layer and outside the layers, so each must land where it belongs.
    layer_columns = result.lambdas[:, :4]
    assert len({round(float(x), 6) for x in layer_columns.flatten()}) == layer_columns.numel()
    initial = merged_parameters(result.vectors, torch.full_like(result.lambdas, 0.3))
    assert not torch.allclose(merged["model.layers.2.mlp.up_proj.weight"],
                              initial["model.layers.2.mlp.up_proj.weight"], atol=1e-4)

    lm = load_model(str(root / f"merged-{method}"))
    tasks = encode_prompts(lm, [str(data)], AdaMergingSettings())
    assert objective(lm, tasks, {}, 4) == pytest.approx(result.objective_after, abs=1e-4)


def test_task_wise_and_tied_embeddings(tmp_path):
    """One weight per model; a tied lm_head follows the merged embeddings; the recipe reproduces it."""
    base = make_model(tmp_path / "base", seed=0, tied=True)
    tuned = [make_model(tmp_path / f"ft{i}", seed=i + 1, base=base, tied=True, noise=0.3) for i in range(2)]
    recipe = write_recipe(tmp_path / "r.yml", base, tuned)
    data = write_prompts(tmp_path / "p.jsonl")
    result = adamerge(recipe, [str(data)], tmp_path / "l.yml", AdaMergingSettings(granularity="task", **FAST),
                      plot=False)
    assert result.lambdas.shape == (2, 1)
    written = yaml.safe_load((tmp_path / "l.yml").read_text())
    assert [m.get("parameters", {}).get("weight") for m in written["models"]] == \
        [None] + [float(x) for x in result.lambdas[:, 0]]
    mergesmith.merge(tmp_path / "l.yml", tmp_path / "out", progress=False)
    merged = load_state(tmp_path / "out")
    for name, tensor in merged_parameters(result.vectors, result.lambdas).items():
        torch.testing.assert_close(merged[name], tensor.detach(), rtol=2e-7, atol=2e-7)


def test_runs_are_deterministic_under_a_seed(family, tmp_path):
    _, base, tuned = family
    recipe = write_recipe(tmp_path / "r.yml", base, tuned)
    data = write_prompts(tmp_path / "p.jsonl", n_choice=10, n_gen=6)

    def run(seed: int, name: str) -> torch.Tensor:
        settings = AdaMergingSettings(seed=seed, samples=6, **{**FAST, "steps": 3})
        return adamerge(recipe, [str(data)], tmp_path / f"{name}.yml", settings, plot=False).lambdas

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    assert torch.equal(first, again)
    assert (tmp_path / "a.yml").read_text() == (tmp_path / "b.yml").read_text()
    assert not torch.equal(first, other)  # another draw of prompts and batches


# ----------------------------------------------------------------------------- mergekit and the CLI


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_written_recipe_is_a_mergekit_config(learned, method):
    from mergekit.config import MergeConfiguration

    root, _, _ = learned
    text = (root / f"learned-{method}.yml").read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert config.merge_method == method
    weights = [m.parameters["weight"] for m in config.models if m.parameters and "weight" in m.parameters]
    assert len(weights) == 2


def test_cli_end_to_end(family, tmp_path, capsys):
    _, base, tuned = family
    recipe = write_recipe(tmp_path / "r.yml", base, tuned)
    data = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "learned.yml"
    code = main(["adamerge", str(recipe), "--tasks", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--no-progress"])
    assert code == 0
    assert "entropy objective" in capsys.readouterr().out
    assert (tmp_path / "learned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = yaml.safe_load((tmp_path / "learned.json").read_text())
    assert len(trace["losses"]) == 2 and len(trace["lambdas"]) == 2 and len(trace["lambdas"][0]) == 5
    assert main(["merge", str(out), str(tmp_path / "merged"), "--no-progress"]) == 0
    # A second run refuses to overwrite without --overwrite.
    assert main(["adamerge", str(recipe), "--tasks", str(data), "--out", str(out), "--steps", "1"]) == 2


def test_bad_arguments_are_one_error_before_any_model_is_loaded(family, tmp_path, monkeypatch):
    _, base, tuned = family

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("mergesmith.evaluate.model.load_model", no_loading)
    data = write_prompts(tmp_path / "p.jsonl")
    linear = write_recipe(tmp_path / "linear.yml", base, tuned, "linear")
    with pytest.raises(InputError) as err:
        adamerge(linear, [str(data), str(tmp_path / "missing.jsonl")], tmp_path / "l.yml",
                 AdaMergingSettings(steps=0))
    text = str(err.value)
    assert "--steps 0: must be at least 1" in text
    assert "missing.jsonl: no such file" in text
    assert "merge_method = 'linear'" in text and "task_arithmetic" in text

    no_base = tmp_path / "nobase.yml"
    no_base.write_text(yaml.safe_dump({"merge_method": "task_arithmetic",
                                       "models": [{"model": str(m)} for m in tuned]}))
    with pytest.raises(InputError, match="base_model is missing"):
        adamerge(no_base, [str(data)], tmp_path / "l.yml")
    ties = write_recipe(tmp_path / "ties.yml", base, tuned, "ties")
    with pytest.raises(InputError, match="pass --prune"):
        adamerge(ties, [str(data)], tmp_path / "l.yml")
    taken = tmp_path / "taken.yml"
    taken.write_text("keep me\n")
    with pytest.raises(InputError, match="already exists"):
        adamerge(write_recipe(tmp_path / "ok.yml", base, tuned), [str(data)], taken)
    assert taken.read_text() == "keep me\n"
    with pytest.raises(InputError, match="the --out path is the input"):
        adamerge(linear, [str(data)], linear)
    assert main(["adamerge", str(linear), "--tasks", str(data), "--out", str(tmp_path / "x.yml"),
                 "--steps", "-1"]) == 2


def test_a_recipe_that_would_not_reproduce_is_never_written(learned):
    """The self-check plans the written recipe and compares every tensor's weights with λ."""
    root, _, results = learned
    result = results["task_arithmetic"]
    raw = yaml.safe_load((root / "task_arithmetic.yml").read_text())
    settings = AdaMergingSettings(**FAST)
    good = adamerging.learned_recipe(raw, result.vectors, result.lambdas, settings)
    adamerging.check_recipe_reproduces(good, result.vectors, result.lambdas)
    swapped = result.lambdas.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # layers 0 and 1 exchanged
    with pytest.raises(RuntimeError, match="model.layers.0"):
        adamerging.check_recipe_reproduces(good, result.vectors, swapped)


def test_a_base_model_it_could_not_run_is_refused_before_loading(family, tmp_path, monkeypatch):
    """Issue 20: the base model is run to learn on, so a model_type transformers does not know is
    refused with the argument problems, not by transformers once planning is done."""
    _, base, tuned = family
    monkeypatch.setattr("mergesmith.evaluate.model.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    odd = [with_model_type(m, tmp_path / m.name) for m in (base, *tuned)]
    with pytest.raises(InputError, match=r"base_model: .*model_type 'fancy_llm'.*no trust_remote_code"):
        adamerge(write_recipe(tmp_path / "r.yml", odd[0], odd[1:]), [str(write_prompts(tmp_path / "p.jsonl"))],
                 tmp_path / "l.yml", AdaMergingSettings(**FAST))


def test_an_existing_out_file_is_said_to_exist_not_to_be_a_file(family, tmp_path):
    """Found trying wrong inputs (issue 20): an existing --out also got '... is a file, not a folder;
    choose another output path', for each of the recipe and its trace, though --out is a file name."""
    _, base, tuned = family
    out = tmp_path / "l.yml"
    out.write_text("keep me\n")
    with pytest.raises(InputError) as err:
        adamerge(write_recipe(tmp_path / "r.yml", base, tuned), [str(write_prompts(tmp_path / "p.jsonl"))], out,
                 AdaMergingSettings(**FAST), plot=False)
    assert err.value.problems == [f"--out {out}: {out} already exists; choose another name or pass --overwrite"]
    under = tmp_path / "l.yml" / "x.yml"
    with pytest.raises(InputError, match=f"{out} is a file, not a folder"):
        adamerge(write_recipe(tmp_path / "r.yml", base, tuned), [str(write_prompts(tmp_path / "p.jsonl"))], under,
                 AdaMergingSettings(**FAST), plot=False)
