"""LoRA model references (``model+adapter``): PEFT's merge_and_unload is the reference."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mergesmith import merge
from mergesmith.checkpoint.lora import split_lora_ref
from mergesmith.errors import InputError
from mergesmith.recipe import load_recipe
from tests.engine.mergekit_ref import run_mergekit
from tests.tiny_models import load_state, make_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(model_dir: Path, out: Path, seed: int = 0, **options) -> Path:
    """A LoRA adapter with random A and B (PEFT's init_lora_weights=False), saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                           "init_lora_weights": False, **options})
    get_peft_model(model, config).save_pretrained(out)
    return out


def peft_merged(model_dir: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("lora") / "base", "llama", seed=0)


VARIANTS = {
    "plain": {},
    "rslora_alpha_pattern": {"use_rslora": True, "alpha_pattern": {"v_proj": 32}},
    "rank_pattern": {"rank_pattern": {"down_proj": 2}},
    "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_equals_peft_merge_and_unload(variant, base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    out = merge({"merge_method": "linear", "dtype": "float32",
                 "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]},
                tmp_path / "out", progress=False).out_dir
    ours, want = load_state(out), peft_merged(base, adapter)
    plain = load_state(base)
    changed = [k for k in want if not torch.equal(want[k], plain[k])]
    assert changed, "the adapter must change some weights"
    for name, tensor in want.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_embedding_layer_saved_in_the_adapter_replaces_the_models(base, tmp_path):
    """PEFT saves a targeted embedding whole and loads it over the model's; so do we."""
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    saved = "base_model.model.model.embed_tokens.base_layer.weight"
    weights[saved] = weights[saved] + 1.0  # now it differs from the model's own embedding
    save_file(weights, adapter / "adapter_model.safetensors")
    out = merge({"merge_method": "linear",
                 "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]},
                tmp_path / "out", progress=False).out_dir
    ours, want = load_state(out), peft_merged(base, adapter)
    name = "model.embed_tokens.weight"
    assert (want[name] - load_state(base)[name]).mean() > 0.5
    torch.testing.assert_close(ours[name], want[name], rtol=1e-6, atol=1e-6)


def test_bfloat16_model_matches_peft_exactly(tmp_path):
    model = make_model(tmp_path / "bf16", "llama", seed=1, dtype=torch.bfloat16)
    adapter = make_adapter(model, tmp_path / "adapter")
    out = merge({"merge_method": "passthrough", "dtype": "bfloat16",
                 "slices": [{"sources": [{"model": f"{model}+{adapter}", "layer_range": [0, 3]}]}]},
                tmp_path / "out", progress=False).out_dir
    ours, want = load_state(out), peft_merged(model, adapter, torch.bfloat16)
    for name, tensor in want.items():
        assert torch.equal(ours[name], tensor), name


def test_ties_with_a_lora_expert_matches_mergekit(base, tmp_path):
    full = make_model(tmp_path / "full", "llama", seed=2, base=base)
    adapter = make_adapter(base, tmp_path / "adapter", seed=3)
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "parameters": {"normalize": True},
              "models": [{"model": str(full), "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": f"{base}+{adapter}", "parameters": {"weight": 0.7, "density": 0.5}}]}
    ours = load_state(merge(recipe, tmp_path / "ours", progress=False).out_dir)
    theirs = load_state(run_mergekit(recipe, tmp_path / "theirs", lora_merge_cache=tmp_path / "lc"))
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dict_form_and_string_form_are_the_same_model(base, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    text = (f"merge_method: linear\nmodels:\n"
            f"  - model: {{model: {{path: {base}}}, lora: {{path: {adapter}}}}}\n"
            f"    parameters: {{weight: 1.0}}\n")
    (tmp_path / "r.yml").write_text(text)
    assert load_recipe(tmp_path / "r.yml").models() == [f"{base}+{adapter}"]


def test_split_lora_ref():
    assert split_lora_ref("a/b") == ("a/b", None)
    assert split_lora_ref("org/model+org/adapter") == ("org/model", "org/adapter")
    with pytest.raises(ValueError, match="exactly one"):
        split_lora_ref("a+b+c")
    with pytest.raises(ValueError, match="exactly one"):
        split_lora_ref("a+")


def test_bad_adapters_are_all_reported_before_any_weight_is_read(base, tmp_path, monkeypatch):
    other = make_model(tmp_path / "other", "llama", seed=4, layers=3, intermediate=48)
    wrong_shapes = make_adapter(other, tmp_path / "wrong_shapes")  # down_proj is 48 wide there
    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    config = json.loads((dora / "adapter_config.json").read_text())
    assert config["use_dora"]

    from mergesmith.checkpoint.reader import Checkpoint

    def no_reads(self, name):
        raise AssertionError(f"read {name} before validation finished")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    recipe = {"merge_method": "linear", "models": [
        {"model": f"{base}+{p}", "parameters": {"weight": 1.0}}
        for p in (wrong_shapes, dora, not_an_adapter, tmp_path / "missing")]}
    with pytest.raises(InputError) as err:
        merge(recipe, tmp_path / "out", progress=False)
    text = str(err.value)
    assert "do not fit the weight" in text and "down_proj" in text
    assert "DoRA" in text
    assert "no adapter_config.json" in text
    assert "missing" in text and "no such model folder" in text
    assert not (tmp_path / "out").exists()
