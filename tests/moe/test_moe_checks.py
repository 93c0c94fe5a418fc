"""Everything is checked before any weight is read, and every problem is reported at once."""

from __future__ import annotations

import json
import warnings

import pytest

from moe_helpers import moe_config
from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.errors import InputError
from mergesmith.moe import build_moe, read_moe_config


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"a weight was read: {name}")
    monkeypatch.setattr(Checkpoint, "read", refuse)


def problems_of(config, tmp_path, **kw) -> list[str]:
    with pytest.raises(InputError) as err:
        build_moe(config, tmp_path / "out", progress=False, **kw)
    return err.value.problems


def test_mergekit_yaml_parses_unchanged(tmp_path):
    text = """
base_model: some/base
gate_mode: hidden_avg
dtype: torch.bfloat16
experts_per_token: 2
architecture: mixtral
experts:
  - source_model: some/expert-a
    positive_prompts: ["code"]
    negative_prompts: ["poem"]
    noise_scale: 0.01
    residual_scale: 0.5
  - source_model: {model: {path: some/expert-b}}
    positive_prompts: ["poem"]
shared_experts:
  - source_model: some/shared
    positive_prompts: ["anything"]
"""
    config, where, _ = read_moe_config(_write(tmp_path, text))
    assert config.experts[1].source_model == "some/expert-b" and config.dtype == "bfloat16"
    assert config.experts[0].residual_scale == 0.5 and config.shared_experts[0].positive_prompts == ["anything"]


def _write(tmp_path, text):
    path = tmp_path / "moe.yml"
    path.write_text(text)
    return path


def test_schema_errors_name_file_and_field(tmp_path):
    path = _write(tmp_path, "experts:\n  - source_model: a\n    noise_scale: loud\n")
    with pytest.raises(InputError) as err:
        read_moe_config(path)
    text = str(err.value)
    assert f"{path}: base_model is required" in text
    assert f"{path}: experts[0].noise_scale Input should be a valid number" in text


def test_unknown_keys_are_ignored_with_a_warning_as_mergekit_ignores_them(tmp_path):
    path = _write(tmp_path, "base_model: b\ntokenizer_source: base\nexperts:\n  - source_model: a\n"
                            "    positive_promts: [x]\n")
    with pytest.warns(UserWarning) as caught:
        read_moe_config(path)
    text = "\n".join(str(w.message) for w in caught)
    assert "tokenizer_source is not a mergekit-moe field and is ignored" in text
    assert "experts[0].positive_promts is not a mergekit-moe field" in text


def test_every_problem_at_once_and_no_weight_read(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    config = moe_config(base, fts, gate_mode="hidden", experts_per_token=3, dtype="int8")
    config["experts"][0]["positive_prompts"] = []
    config["experts"][1]["positive_prompts"].append("   ")
    config["experts"].append({"source_model": str(tmp_path / "missing"), "positive_prompts": ["t3"]})
    problems = problems_of(config, tmp_path, device="cuda:7")
    joined = "\n".join(problems)
    for expected in ("dtype = 'int8'", "experts[0] (", "has no positive_prompts", "experts[1].positive_prompts[2] is empty",
                     "experts[2].source_model", "no such model folder", "--device cuda:7"):
        assert expected in joined, (expected, joined)


def test_experts_per_token_at_most_experts(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    problems = problems_of(moe_config(base, fts, experts_per_token=3), tmp_path)
    assert any("experts_per_token = 3 is more than the 2 experts" in p for p in problems)


def test_identical_prompts_refused_unless_random(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    config = moe_config(base, fts)
    config["experts"][1]["positive_prompts"] = config["experts"][0]["positive_prompts"]
    config["experts"][1]["negative_prompts"] = config["experts"][0]["negative_prompts"]
    assert any("same positive and negative prompts" in p for p in problems_of(config, tmp_path))
    for mode in ("random", "uniform_random", "arrow"):
        config = moe_config(base, fts, gate_mode=mode)
        for e in config["experts"]:
            del e["positive_prompts"], e["negative_prompts"]
        assert build_moe(config, tmp_path / "out", dry_run=True).plan.arch.name == "Mixtral"
    config["gate_mode"] = "ridge"
    assert sum("has no positive_prompts; gate_mode ridge" in p for p in problems_of(config, tmp_path)) == 2


def test_incompatible_models(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    _, other = experts("llama", 1, intermediate=48)
    _, qwen = experts("qwen2", 1)
    problems = problems_of(moe_config(base, [fts[0], other[0], qwen[0]]), tmp_path)
    joined = "\n".join(problems)
    assert "intermediate_size = 48, but the base model has 32" in joined
    assert "model_type = 'qwen2', but the base model has 'llama'" in joined
    assert "no output architecture can hold these models" in joined


def test_tied_embeddings_must_agree(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    _, tied = experts("llama", 1, tied=True)
    problems = problems_of(moe_config(base, [fts[0], tied[0]]), tmp_path)
    assert any("tie_word_embeddings = True, but the base model has False" in p for p in problems)


def test_shared_expert_counts_per_architecture(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    mixtral = problems_of(moe_config(base, fts, shared=[fts[0]], architecture="mixtral"), tmp_path)
    assert any("Mixtral takes 0 shared experts, the config has 1" in p for p in mixtral)
    qbase, qfts = experts("qwen2", 2)
    qwen = problems_of(moe_config(qbase, qfts, architecture="qwen"), tmp_path)
    assert any("Qwen MoE takes 1 shared experts, the config has 0" in p for p in qwen)
    assert any("Qwen3 MoE takes qwen3 models, not qwen2" in p for p in qwen)
    deepseek = problems_of(moe_config(base, fts, architecture="deepseek"), tmp_path)
    assert any("Deepseek MoE output is not supported yet" in p for p in deepseek)


def test_default_architecture_as_mergekit_chooses(experts, tmp_path):
    base, fts = experts("llama", 2)
    assert build_moe(moe_config(base, fts), tmp_path / "o", dry_run=True).plan.arch.name == "Mixtral"
    plan = build_moe(moe_config(base, fts, shared=[fts[0]]), tmp_path / "o", dry_run=True).plan
    assert plan.arch.name == "Qwen MoE"  # llama experts with one shared expert: Mixtral cannot, Qwen2-MoE can
    qbase, qfts = experts("qwen3", 2)
    assert build_moe(moe_config(qbase, qfts), tmp_path / "o", dry_run=True).plan.arch.name == "Qwen3 MoE"


def test_power_of_two_warning(experts, tmp_path):
    base, fts = experts("llama", 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_moe(moe_config(base, fts), tmp_path / "out", dry_run=True)
    assert any("3 experts is not a power of two; llama.cpp" in str(w.message) for w in caught)


def test_output_overlapping_an_input_is_refused(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    with pytest.raises(InputError) as err:
        build_moe(moe_config(base, fts), base / "inside", overwrite=True, progress=False)
    assert "lies inside the input" in str(err.value)
    with pytest.raises(InputError) as err:
        build_moe(moe_config(base, fts), fts[0], overwrite=True, progress=False)
    assert "is the input" in str(err.value)


def test_existing_output_needs_overwrite(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    (tmp_path / "out").mkdir()
    problems = problems_of(moe_config(base, fts), tmp_path)
    assert any("already exists" in p and "--overwrite" in p for p in problems)


def test_dry_run_reads_no_weight_and_predicts_peak(experts, tmp_path, no_weight_reads):
    base, fts = experts("llama", 2)
    result = build_moe(moe_config(base, fts), tmp_path / "out", dry_run=True)
    text = result.plan.describe()
    assert "model.layers.1.block_sparse_moe.experts.1.w2.weight" in text and "predicted peak memory" in text
    assert result.plan.predicted_peak_bytes() >= sum(i.nbytes for i in result.plan.base.checkpoint.infos.values())
    assert not (tmp_path / "out").exists()
    json.dumps(result.plan.out_config)
