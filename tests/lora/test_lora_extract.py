"""extract-lora: the folded adapter reproduces the fine-tune within the reported error; parity with
mergekit-extract-lora 0.1.5; embeddings, biases, a grown vocabulary, include/exclude."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.lora.extract import ExtractOptions, extract_lora
from tests.lora.lora_fixtures import load_folded
from tests.tiny_models import load_state, make_model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = make_model(root / "base", "llama", seed=0)
    return base, make_model(root / "ft", "llama", seed=1, base=base)


def options(**kw) -> ExtractOptions:
    return ExtractOptions(progress=False, **kw)


def relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).double().norm() / scale.double().norm())


def test_folded_adapter_reproduces_the_finetune_within_the_reported_error(family, tmp_path):
    base, ft = family
    result = extract_lora(ft, base, tmp_path / "out", options(max_rank=3))
    folded, want, before = load_folded(base, result.out_dir), load_state(ft), load_state(base)
    assert result.report and all(r["rank"] == 3 for r in result.report.values())
    for module, rep in result.report.items():
        name = f"{module}.weight"
        error = relative(folded[name], want[name], want[name] - before[name])
        assert error == pytest.approx(rep["relative_error"], rel=1e-3, abs=1e-6)
        assert 0 < rep["relative_error"] < 1
    # embeddings, LM head and norms changed and are saved whole, as mergekit does by default
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert name in result.saved
        torch.testing.assert_close(folded[name], want[name], rtol=0, atol=0)
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and "lm_head" in config["modules_to_save"]


def test_randomized_svd_reports_the_error_of_what_it_writes(family, tmp_path):
    """--svd randomized (auto picks it only for modules four times wider than max-rank + 16;
    these are exact): the reported error is measured on the written factors."""
    base, ft = family
    auto = extract_lora(ft, base, tmp_path / "auto", options(max_rank=2))
    assert {r["svd"] for r in auto.report.values()} == {"exact"}
    result = extract_lora(ft, base, tmp_path / "out", options(max_rank=2, svd="randomized"))
    assert {r["svd"] for r in result.report.values()} == {"randomized"}
    folded, want, before = load_folded(base, result.out_dir), load_state(ft), load_state(base)
    for module, rep in result.report.items():
        name = f"{module}.weight"
        error = relative(folded[name], want[name], want[name] - before[name])
        assert error == pytest.approx(rep["relative_error"], rel=1e-3, abs=1e-6)
        assert rep["relative_error"] >= auto.report[module]["relative_error"] - 1e-6  # never beats the optimum


def test_full_rank_and_embed_lora_reproduce_the_finetune(family, tmp_path):
    base, ft = family
    result = extract_lora(ft, base, tmp_path / "out", options(max_rank=64, embed_lora=True))
    folded, want = load_folded(base, result.out_dir), load_state(ft)
    assert "model.embed_tokens" in result.report and "lm_head" in result.report
    for name, tensor in want.items():
        torch.testing.assert_close(folded[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
    assert max(r["relative_error"] for r in result.report.values()) < 1e-6


def test_rank_by_energy_is_the_smallest_that_keeps_the_share(family, tmp_path):
    base, ft = family
    result = extract_lora(ft, base, tmp_path / "out", options(energy=0.8))
    want, before = load_state(ft), load_state(base)
    ranks = set()
    for module, rep in result.report.items():
        s = torch.linalg.svdvals((want[f"{module}.weight"] - before[f"{module}.weight"]).double())
        share = (s.square().cumsum(0) / s.square().sum()).tolist()
        k = rep["rank"]
        ranks.add(k)
        assert share[k - 1] >= 0.8 - 1e-9 and (k == 1 or share[k - 2] < 0.8)
    assert len(ranks) > 1  # ranks differ per module, so rank_pattern is needed
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    load_folded(base, result.out_dir)  # and PEFT loads it


def test_same_singular_values_and_folded_weights_as_mergekit(family, tmp_path):
    """mergekit-extract-lora 0.1.5 at the same rank: the same spectrum and the same folded model.
    (Factors may differ by the signs of singular vectors; their products may not.)"""
    base, ft = family
    mergekit = Path(sys.executable).parent / "mergekit-extract-lora"
    if not mergekit.exists():
        pytest.skip("mergekit is not installed")
    subprocess.run([str(mergekit), "--model", str(ft), "--base-model", str(base), "--out-path",
                    str(tmp_path / "mk"), "--max-rank", "4"], check=True, capture_output=True)
    result = extract_lora(ft, base, tmp_path / "ours", options(max_rank=4, svd="exact"))
    theirs = load_state_file(tmp_path / "mk" / "adapter_model.safetensors")
    for module, rep in result.report.items():
        a = theirs[f"base_model.model.{module}.lora_A.weight"]
        b = theirs[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:4], torch.tensor(rep["singular_values"]),
                                   atol=1e-6, rtol=1e-5)
    folded_mk, folded_ours = load_folded(base, tmp_path / "mk"), load_folded(base, result.out_dir)
    for name, tensor in folded_mk.items():
        torch.testing.assert_close(folded_ours[name], tensor, atol=2e-6, rtol=1e-5, msg=name)


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_bias_deltas_are_lora_biases_where_peft_can_fold_them(tmp_path):
    """qwen2 has q/k/v biases only: carried as lora_B.bias (lora_bias: true) when only biased modules
    are extracted; otherwise a clear refusal naming the ways on; saved whole with --save-module."""
    base = make_model(tmp_path / "base", "qwen2", seed=0)
    ft = make_model(tmp_path / "ft", "qwen2", seed=1, base=base)
    want = load_state(ft)
    biases = ("model.layers.0.self_attn.q_proj.bias", "model.layers.2.self_attn.v_proj.bias")
    with pytest.raises(InputError, match=r"9 biases changed.*12 have none.*--save-module.*--skip-bias"):
        extract_lora(ft, base, tmp_path / "refused", options(max_rank=64))
    result = extract_lora(ft, base, tmp_path / "qkv", options(max_rank=64, include=(r"[qkv]_proj",)))
    assert json.loads((result.out_dir / "adapter_config.json").read_text())["lora_bias"] is True
    folded = load_folded(base, result.out_dir)
    for name in biases + ("model.layers.1.self_attn.k_proj.weight",):
        torch.testing.assert_close(folded[name], want[name], atol=2e-6, rtol=1e-5)
    saved = extract_lora(ft, base, tmp_path / "saved", options(max_rank=64, save_modules=("q_proj", "k_proj",
                                                                                         "v_proj")))
    folded = load_folded(base, saved.out_dir)
    for name, tensor in want.items():
        torch.testing.assert_close(folded[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
    skipped = extract_lora(ft, base, tmp_path / "skipped", options(max_rank=64, skip_bias=True))
    assert set(biases) <= set(skipped.dropped)


def test_include_exclude_and_a_grown_vocabulary(family, tmp_path):
    base, ft = family
    result = extract_lora(ft, base, tmp_path / "out", options(max_rank=2, include=(r"self_attn",),
                                                             exclude=(r"\.k_proj",)))
    assert result.report and all("self_attn" in m and "k_proj" not in m for m in result.report)
    assert "model.layers.0.mlp.up_proj.weight" in result.dropped
    grown = make_model(tmp_path / "grown", "llama", seed=2, base=base, vocab=72)
    with pytest.raises(InputError, match=r"vocabulary grew.*64 -> 72 rows.*resize_token_embeddings"):
        extract_lora(grown, base, tmp_path / "out2", options())
    assert not (tmp_path / "out2").exists()


def test_cli_reports_every_bad_option_at_once(family, tmp_path, capsys):
    base, ft = family
    code = main(["extract-lora", str(tmp_path / "out"), "--model", str(ft), "--base-model", str(base),
                 "--max-rank", "0", "--energy", "1.5", "-i", "(", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-rank 0" in err and "--energy 1.5" in err and "--include-regex '('" in err
    assert main(["extract-lora", str(tmp_path / "out"), "--model", str(ft), "--base-model", str(base),
                 "--max-rank", "2", "--no-progress"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_tied_embedding_is_extracted_as_lora_so_the_head_follows(tmp_path):
    """Saved whole (modules_to_save), PEFT would replace the embedding alone and leave the tied
    head at the base's weights: a tied embedding is extracted as LoRA, and saving it whole refused."""
    base = make_model(tmp_path / "base", "llama", seed=0, tied=True)
    ft = make_model(tmp_path / "ft", "llama", seed=1, base=base, tied=True)
    result = extract_lora(ft, base, tmp_path / "out", options(max_rank=64))
    assert "model.embed_tokens" in result.report
    folded, want = load_folded(base, result.out_dir), load_state(ft)
    torch.testing.assert_close(folded["lm_head.weight"], want["model.embed_tokens.weight"], atol=2e-6, rtol=1e-5)
    with pytest.raises(InputError, match="tied to model.embed_tokens.weight.*drop that --save-module"):
        extract_lora(ft, base, tmp_path / "saved", options(save_modules=("embed_tokens",)))
