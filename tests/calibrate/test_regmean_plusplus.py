"""RegMean++ on tiny Llama models: Grams through the merged blocks, against a plainly written reference."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import mergesmith
import mergesmith.calibrate.sequential as sequential
from mergesmith.calibrate import StatsStore
from mergesmith.errors import InputError
from mergesmith.calibrate.data import encode_items, select_items
from mergesmith.evaluate.model import load_model
from calibration_data import write_calibration
from tiny_models import load_state

ALPHA = 0.5


def recipe_for(method, models, data, cache, per_model=None, **extra):
    recipe = {"merge_method": method, "models": [{"model": str(m)} for m in models],
              "parameters": {"alpha": ALPHA},
              "calibration": {"files": [str(data)], "samples": 5, "max_length": 8, "batch_size": 2,
                              "cache_dir": str(cache)}}
    if per_model:
        for entry, files in zip(recipe["models"], per_model):
            entry["calibration"] = {"files": [str(files)]}
    recipe.update(extra)
    return recipe


@pytest.fixture(scope="module")
def merged_pp(tmp_path_factory, model_family):
    """One RegMean++ merge of two fine-tunes, each on its own calibration data."""
    _, (a, b, _) = model_family()
    root = tmp_path_factory.mktemp("rmpp")
    data = [write_calibration(root / "cal_a.jsonl"), write_calibration(root / "cal_b.jsonl", n=6, offset=11)]
    recipe = recipe_for("regmean_plusplus", [a, b], data[0], root / "cache", per_model=data)
    result = mergesmith.merge(recipe, root / "out", progress=False)
    return {"models": [a, b], "data": data, "recipe": recipe, "result": result, "out": root / "out", "root": root}


def sequences_of(path, data, answers=False):
    """The calibration prompts' token ids (followed by their answers' with ``answers``), as the harness
    makes them (the same for the reference)."""
    from mergesmith.calibrate.data import CalibrationSettings

    lm = load_model(path, dtype="float32")
    settings = CalibrationSettings((str(data),), samples=5, max_length=8, include_answers=answers)
    return [s.ids for s in encode_items(lm, select_items(settings), 8, answers)]


def reference_regmean_plusplus(paths, data, alpha, answers=False):
    """RegMean++ written plainly on whole Hugging Face models, one sequence at a time, no padding.

    Step l: put expert t's layer l into the model merged so far, hook its linear layers'
    inputs on expert t's prompts (one Gram per linear layer), then solve each linear
    weight, average the rest. The head: the expert's final norm, the Gram at lm_head.
    """
    import transformers

    experts = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]
    merged = transformers.AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32).eval()
    prompts = [sequences_of(p, d, answers) for p, d in zip(paths, data)]

    def average(modules):
        return {k: torch.stack([m.state_dict()[k] for m in modules]).mean(0) for k in modules[0].state_dict()}

    def grams(linears, seqs):
        sums = {n: 0 for n in linears}
        count = {"tokens": 0}
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: sums.__setitem__(
            n, sums[n] + args[0][0].double().T @ args[0][0].double())) for n, m in linears.items()]
        with torch.no_grad():
            for ids in seqs:
                merged(torch.tensor([ids]))
                count["tokens"] += len(ids)
        for h in hooks:
            h.remove()
        return {n: (s / count["tokens"]).float().double() for n, s in sums.items()}

    def solve(weights, gs):
        scaled = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in gs]
        rhs = sum(g @ w.double().T for g, w in zip(scaled, weights))
        return torch.linalg.solve(sum(scaled), rhs).T.float()

    merged.model.embed_tokens.load_state_dict(average([e.model.embed_tokens for e in experts]))
    stages = [(f"model.layers.{l}", lambda m, l=l: m.model.layers[l]) for l in range(len(merged.model.layers))]
    if merged.lm_head.weight is not merged.model.embed_tokens.weight:
        stages.append(("model.norm", lambda m: m.model.norm))
    else:  # a tied head is the embedding, averaged; the final norm too
        merged.model.norm.load_state_dict(average([e.model.norm for e in experts]))
    for prefix, part in stages:
        own = part(merged)
        keep = {k: v.clone() for k, v in own.state_dict().items()}
        linears = ({n: m for n, m in own.named_modules() if isinstance(m, torch.nn.Linear)} if prefix != "model.norm"
                   else {"": merged.lm_head})
        per_expert = []
        for expert, seqs in zip(experts, prompts):
            own.load_state_dict(part(expert).state_dict())
            per_expert.append(grams(linears, seqs))
        own.load_state_dict(keep)
        merged_part = average([part(e) for e in experts])
        for n in linears:
            if prefix == "model.norm":
                merged.lm_head.weight.data.copy_(solve([e.lm_head.weight for e in experts], [g[n] for g in per_expert]))
            else:
                merged_part[f"{n}.weight"] = solve([part(e).get_submodule(n).weight for e in experts],
                                                   [g[n] for g in per_expert])
        own.load_state_dict(merged_part)
    return merged.state_dict()


def test_matches_a_plain_whole_model_reference(merged_pp):
    expected = reference_regmean_plusplus(merged_pp["models"], merged_pp["data"], ALPHA)
    got = load_state(merged_pp["out"])
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_on_answers_matches_the_reference_on_answers(merged_pp, tmp_path):
    """calibration.include_answers: every expert's stream carries its prompts and their answers."""
    recipe = {**merged_pp["recipe"], "calibration": {**merged_pp["recipe"]["calibration"], "include_answers": True}}
    result = mergesmith.merge(recipe, tmp_path / "out", progress=False)
    assert len(result.plan.stats.computed) == 2  # the prompt-only entries are not reused
    lengths = [sum(map(len, sequences_of(m, d, True))) for m, d in zip(merged_pp["models"], merged_pp["data"])]
    prompts = [sum(map(len, sequences_of(m, d))) for m, d in zip(merged_pp["models"], merged_pp["data"])]
    assert all(a > p for a, p in zip(lengths, prompts))
    assert [StatsStore(m.folders[sequential.KIND]).index["tokens"] for m in result.plan.stats.models] == lengths
    expected = reference_regmean_plusplus(merged_pp["models"], merged_pp["data"], ALPHA, answers=True)
    got = load_state(tmp_path / "out")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])  # biases on q, k, v; a scaled, tied embedding
def test_other_architectures_match_the_reference(arch, model_family, tmp_path):
    _, (a, b, _) = model_family(arch)
    data = [write_calibration(tmp_path / "cal_a.jsonl"), write_calibration(tmp_path / "cal_b.jsonl", n=6, offset=11)]
    recipe = recipe_for("regmean_plusplus", [a, b], data[0], tmp_path / "cache", per_model=data)
    mergesmith.merge(recipe, tmp_path / "out", progress=False)
    expected = reference_regmean_plusplus([a, b], data, ALPHA)
    got = load_state(tmp_path / "out")
    # rtol: one of qwen2's layer-1 k_proj entries (about 0.9) was off by 1.2e-5 on earlier
    # installs and is by 2.2e-5 with transformers 5.24 (1 of 128 entries, the rest within 1e-5):
    # the reference's float32 forward through the merged layer 0 rounds differently from ours,
    # and the solve amplifies it.
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=5e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_streamed_merge_equals_the_fusion_bench_step_on_the_cached_grams(merged_pp):
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import merging_with_regmean_weights

    stores = [StatsStore(m.folders["gram_plusplus"]) for m in merged_pp["result"].plan.stats.models]
    inputs = [load_state(p) for p in merged_pp["models"]]
    got = load_state(merged_pp["out"])
    for layer in (0, 2):
        prefix = f"model.layers.{layer}."
        names = [n for n in inputs[0] if n.startswith(prefix)]
        params = {n[len(prefix):]: [x[n] for x in inputs] for n in names}
        grams = [{n[len(prefix):-len(".weight")]: StatsStore.read(s.refs(n)["gram_plusplus"])
                  for n in names if s.refs(n)} for s in stores]
        expected = merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=ALPHA)
        for suffix, tensor in expected.items():
            torch.testing.assert_close(got[prefix + suffix], tensor, rtol=0, atol=1e-5, msg=suffix)


def test_block_zero_grams_equal_plain_regmean_when_the_embeddings_agree(tmp_path, model_family):
    # Block 0's input is the merged embedding; with equal embeddings it is every expert's own.
    _, (a, b, _) = model_family()
    copies = []
    for i, src in enumerate((a, b)):
        dst = shutil.copytree(src, tmp_path / f"m{i}")
        state = load_state(dst)
        state["model.embed_tokens.weight"] = load_state(a)["model.embed_tokens.weight"]
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        copies.append(dst)
    data = write_calibration(tmp_path / "cal.jsonl")
    plain = mergesmith.merge(recipe_for("regmean", copies, data, tmp_path / "cache"), tmp_path / "o1", progress=False)
    pp = mergesmith.merge(recipe_for("regmean_plusplus", copies, data, tmp_path / "cache"), tmp_path / "o2",
                          progress=False)
    for m_plain, m_pp in zip(plain.plan.stats.models, pp.plan.stats.models):
        s_plain, s_pp = StatsStore(m_plain.folders["gram"]), StatsStore(m_pp.folders["gram_plusplus"])
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            g0 = [StatsStore.read(s.refs(f"model.layers.0.{proj}.weight")[k])
                  for s, k in ((s_plain, "gram"), (s_pp, "gram_plusplus"))]
            torch.testing.assert_close(g0[1], g0[0], rtol=0, atol=1e-5)
            g1 = [StatsStore.read(s.refs(f"model.layers.1.{proj}.weight")[k])
                  for s, k in ((s_plain, "gram"), (s_pp, "gram_plusplus"))]
            assert not torch.allclose(g1[1], g1[0], atol=1e-5)  # block 1 sees the merged block 0


def test_the_second_merge_reuses_the_cache(merged_pp, monkeypatch, tmp_path, capsys):
    def no_recomputation(*args, **kwargs):
        raise AssertionError("RegMean++ statistics were recomputed although cached")

    monkeypatch.setattr(sequential, "collect_plusplus", no_recomputation)
    second = mergesmith.merge(merged_pp["recipe"], tmp_path / "again", progress=False)
    assert second.plan.stats.computed == []
    first, again = load_state(merged_pp["out"]), load_state(tmp_path / "again")
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    # Another alpha changes the merged blocks below, hence the Grams: a new cache entry.
    other = dict(merged_pp["recipe"], parameters={"alpha": 0.9})
    planned = mergesmith.merge(other, tmp_path / "dry", dry_run=True)
    assert planned.plan.stats.missing()
    text = planned.plan.describe(mergesmith.engine.MergeOptions(), full=False)
    assert "one block of each model" in text and "calibration peak memory" in text


def test_layer_slices_that_move_layers_are_refused(merged_pp, tmp_path):
    a, b = merged_pp["models"]
    recipe = recipe_for("regmean_plusplus", [a, b], merged_pp["data"][0], tmp_path / "cache")
    del recipe["models"]
    recipe["slices"] = [{"sources": [{"model": str(a), "layer_range": [0, 3]},
                                     {"model": str(b), "layer_range": [0, 3]}]}]
    mergesmith.merge(recipe, tmp_path / "ok", progress=False)  # the same layers: fine
    recipe["slices"] = [{"sources": [{"model": str(a), "layer_range": [0, 2]},
                                     {"model": str(b), "layer_range": [1, 3]}]}]
    with pytest.raises(InputError, match="merges layer l of every model into layer l"):
        mergesmith.merge(recipe, tmp_path / "moved", progress=False)


def test_calibrate_command_computes_them_and_dry_run_prints_the_bound(merged_pp, tmp_path, capsys):
    import yaml

    from mergesmith.cli import main

    recipe = dict(merged_pp["recipe"], calibration=dict(merged_pp["recipe"]["calibration"],
                                                        cache_dir=str(tmp_path / "cache")))
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["calibrate", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gram_plusplus; 0 cached" in out and "one block of each model" in out
    assert main(["calibrate", str(path), "--no-progress"]) == 0
    folders = list((tmp_path / "cache").glob("gram_plusplus-*/index.json"))
    assert len(folders) == 2
