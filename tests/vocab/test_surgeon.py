"""tokensurgeon: normalised vocabularies, a hand-computed pursuit, exact rows copied bit for bit,
the mean and zero baselines, parity with mergekit-tokensurgeon 0.1.5, and a model that loads and
generates with the donor's tokenizer (tied and untied heads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.vocab.surgeon import (Assignment, match_tokens, normalise, normalised_vocabulary,
                                      orthogonal_matching_pursuit, prefixes, remap_rows)
from mergesmith.vocab.transplant import SurgeonOptions, tokensurgeon

MODEL_TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hello world, the end", "numbers 12 and 34"] * 5
DONOR_TEXTS = ["the quick brown fox jumps over the lazy dog", "hello there, general kenobi",
               "parks and cats and mats"] * 5


def build(path: Path, texts: list[str], hidden: int, seed: int, tied: bool, padded_vocab: int = 0) -> Path:
    """A tiny llama with its own byte-level BPE tokenizer (trained on ``texts``); ``padded_vocab``
    extra embedding rows that no token uses, as real checkpoints pad to a multiple of 64."""
    import transformers as tf

    from mergesmith.zoo.tokenizer import train_tokenizer

    tok = train_tokenizer(texts, 330)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tok) + padded_vocab, hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A model (hidden 64, untied) and a donor (hidden 128) whose tokenizers differ."""
    root = tmp_path_factory.mktemp("surgeon")
    return build(root / "model", MODEL_TEXTS, 64, 0, False), build(root / "donor", DONOR_TEXTS, 128, 1, False)


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def vocabularies(model: Path, donor: Path) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).get_vocab(), AutoTokenizer.from_pretrained(donor).get_vocab()


def quiet(**kw) -> SurgeonOptions:
    return SurgeonOptions(progress=False, **kw)


# --- the pieces ---------------------------------------------------------------------------------

def test_a_target_two_atoms_make_is_recovered_exactly_by_hand():
    """atoms a0=(1,0,0), a1=(1,1,0), a2=(0,0,1), a3=(1,-1,.5); y = 2 a1 + a2 = (2,2,1).
    Step 1: |<y,a>| = 2, 4, 1, 0.5 -> a1; residual y - (4/2) a1 = (0,0,1).
    Step 2: |<r,a>| = 0, -, 1, 0.5 -> a2; the fit is exact: coefficients (2, 1).
    A third step finds nothing left to fit and gets coefficient 0."""
    atoms = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1], [1, -1, 0.5]])
    y = torch.tensor([[2.0, 2, 1]])
    picked, coeffs = orthogonal_matching_pursuit(y, atoms, 2)
    assert picked.tolist() == [[1, 2]]
    torch.testing.assert_close(coeffs, torch.tensor([[2.0, 1.0]]), atol=1e-6, rtol=0)
    picked, coeffs = orthogonal_matching_pursuit(y, atoms, 3)
    assert picked[0, :2].tolist() == [1, 2]
    torch.testing.assert_close(coeffs, torch.tensor([[2.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_a_dependent_atom_gets_coefficient_zero_not_noise():
    """k larger than the dimension: the 3rd and 4th atoms add no direction; mergekit's pursuit would
    divide by a clamped ~0 norm there. The fit stays the least-squares one."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(10, 2, generator=gen)
    y = torch.randn(3, 2, generator=gen)
    picked, coeffs = orthogonal_matching_pursuit(y, atoms, 4)
    assert torch.all(coeffs[:, 2:] == 0)
    fit = torch.einsum("bk,bkd->bd", coeffs, atoms[picked])
    torch.testing.assert_close(fit, y, atol=1e-5, rtol=1e-5)


def test_surface_forms_normalise_to_the_same_bytes():
    assert normalise("Ġhello", "byte_level") == normalise("▁hello", "metaspace") == ("text", b" hello")
    assert normalise("Ã©", "byte_level") == normalise("é", "metaspace") == ("text", "é".encode())
    assert normalise("Ċ", "byte_level") == ("text", b"\n")
    assert normalise("<0x41>", "metaspace") == ("byte", 0x41)
    assert normalise("<|endoftext|>", "byte_level", added=True) == ("text", b"<|endoftext|>")
    vocab = normalised_vocabulary({"<|endoftext|>": 0, "x": 1}, "byte_level", ["<|endoftext|>"],
                                  {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    assert vocab == {("special", "eos_token"): 0, ("text", b"x"): 1}  # end of sequence first
    assert list(prefixes(("text", b" hello"))) == [("text", b" hell"), ("text", b" hel"), ("text", b" he"),
                                                   ("text", b" h")]


def test_matching_order_exact_then_byte_then_prefix():
    model = normalised_vocabulary({"▁hel": 0, "A": 1, "<0x42>": 2, "▁the": 3}, "metaspace")
    donor = normalised_vocabulary({"Ġthe": 0, "<0x41>": 1, "B": 2, "Ġhello": 3, "zz": 4}, "byte_level")
    plain = match_tokens(model, donor, 4, 5, byte_match=False, prefix_match=False)
    assert plain.copies == {0: 3} and plain.approximate == [1, 2, 3, 4]
    full = match_tokens(model, donor, 4, 5, byte_match=True, prefix_match=True)
    assert full.copies == {0: 3, 1: 1, 2: 2, 3: 0} and full.approximate == [4]
    assert full.counts == {"exact": 1, "byte": 2, "prefix": 1}
    short = match_tokens(model, donor, 4, 4, byte_match=False, prefix_match=False)
    assert short.unbacked == [4]  # no donor row to approximate from


def test_a_bias_keeps_matched_rows_and_is_zero_elsewhere():
    bias = torch.tensor([1.0, 2.0, 3.0])
    assignment = Assignment(copies={0: 2, 3: 0}, approximate=[1, 2])
    assert remap_rows(bias, assignment, 5).tolist() == [3.0, 0.0, 0.0, 1.0, 0.0]


# --- whole models -------------------------------------------------------------------------------

def test_exact_matches_copied_bit_for_bit_and_config_is_the_donors(pair, tmp_path):
    model, donor = pair
    out = tokensurgeon(model, donor, tmp_path / "out", quiet()).out_dir
    model_vocab, donor_vocab = vocabularies(model, donor)
    ours, theirs = state(out), state(model)
    shared = [(donor_vocab[t], i) for t, i in model_vocab.items() if t in donor_vocab]
    assert len(shared) > 200
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[name].shape == (len(donor_vocab), 64)
        for d, m in shared:
            assert torch.equal(ours[name][d], theirs[name][m]), (name, d, m)
    for name, tensor in theirs.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[name], tensor), name
    config, donor_config = (json.loads((p / "config.json").read_text()) for p in (out, donor))
    assert config["vocab_size"] == donor_config["vocab_size"] == len(donor_vocab)
    assert config["hidden_size"] == 64
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == donor_config[key]
    assert (out / "tokenizer.json").read_bytes() == (donor / "tokenizer.json").read_bytes()
    report = json.loads((out / "mergesmith_tokensurgeon.json").read_text())
    assert report["tensors"]["lm_head.weight"]["approximated"] == len(donor_vocab) - len(shared)


def test_own_tokenizer_gives_the_same_model(pair, tmp_path):
    """The model as its own donor: every token an exact match, every tensor unchanged (and
    --overwrite replaces an earlier output)."""
    model, _ = pair
    tokensurgeon(model, model, tmp_path / "out", quiet(approximation="zero"))
    result = tokensurgeon(model, model, tmp_path / "out", quiet(overwrite=True))
    assert result.report["tensors"]["lm_head.weight"]["approximated"] == 0
    ours, theirs = state(result.out_dir), state(model)
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], t) for n, t in theirs.items())


@pytest.mark.parametrize("approximation", ["mean", "zero"])
def test_baselines(pair, tmp_path, approximation):
    model, donor = pair
    out = tokensurgeon(model, donor, tmp_path / "out", quiet(approximation=approximation)).out_dir
    model_vocab, donor_vocab = vocabularies(model, donor)
    missing = [i for t, i in donor_vocab.items() if t not in model_vocab]
    ours, theirs = state(out), state(model)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = theirs[name].mean(dim=0) if approximation == "mean" else torch.zeros(64)
        for i in missing:
            torch.testing.assert_close(ours[name][i], want, atol=1e-7, rtol=1e-6)


def test_same_rows_as_mergekit_tokensurgeon(pair, tmp_path):
    """mergekit-tokensurgeon 0.1.5 with its defaults (OMP, k=64) writes the same embedding and LM head.

    Both pick the same shared rows and fit the same least-squares coefficients in float32; they
    differ in the orthogonalisation (one Gram-Schmidt pass against two) and the solve, so agreement
    is to float32 rounding amplified by the fit's conditioning (64 random atoms in 128 dimensions:
    condition number about 10): 1e-5 of the largest entry is a hundred times that rounding."""
    model, donor = pair
    mergekit = Path(sys.executable).parent / "mergekit-tokensurgeon"
    if not mergekit.exists():
        pytest.skip("mergekit is not installed")
    # One thread: the math is tiny, and a second thread only contends on a shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(mergekit), str(model), str(donor), str(tmp_path / "mk")], check=True, capture_output=True,
                   env=env)
    ours = state(tokensurgeon(model, donor, tmp_path / "ours", quiet()).out_dir)
    theirs = state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape, name
        torch.testing.assert_close(ours[name], tensor, atol=1e-5 * tensor.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_loads_and_generates_with_the_donors_tokenizer(pair, tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, donor = pair
    if tied:
        model = build(tmp_path / "tied", MODEL_TEXTS, 64, 2, True)
        donor = build(tmp_path / "padded", DONOR_TEXTS, 128, 3, False, padded_vocab=7)
    out = tokensurgeon(model, donor, tmp_path / "out", quiet()).out_dir
    assert ("lm_head.weight" in state(out)) is not tied
    net = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    rows = len(tok) + (7 if tied else 0)  # the donor's padding rows are kept
    assert net.get_input_embeddings().weight.shape == (rows, 64)
    if tied:
        assert net.lm_head.weight.data_ptr() == net.get_input_embeddings().weight.data_ptr()
    ids = tok("the quick brown fox", return_tensors="pt")
    generated = net.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4
    assert int(generated.max()) < rows
    torch.testing.assert_close(net(**ids).logits[0, -1].shape, torch.Size([rows]))


# --- bad input, nothing half-written --------------------------------------------------------------

def sentencepiece_model(path: Path, texts: list[str], hidden: int) -> Path:
    """A tiny llama whose tokenizer is SentencePiece-style: ``▁`` for spaces, byte-fallback tokens
    ``<0x00>``..``<0xFF>`` (as Llama 2's), trained on ``texts``."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(5)
    cfg = tf.LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_sentencepiece_model_byte_level_donor_match_by_meaning(tmp_path):
    """'▁café' (SentencePiece) and 'ĠcafÃ©' (byte-level) spell the same bytes: the row is copied;
    the byte-level 'Ã' (byte 0xC3) takes the row of the byte-fallback token '<0xC3>'; the donor's
    '<|endoftext|>' end of sequence takes the model's '</s>' (both eos_token)."""
    texts = ["the café is open", "a café and a cat", "the cat in the café"] * 8
    model = sentencepiece_model(tmp_path / "sp", texts, 64)
    donor = build(tmp_path / "bl", texts, 128, 6, False)
    out = tokensurgeon(model, donor, tmp_path / "out", quiet(k=8)).out_dir
    model_vocab, donor_vocab = vocabularies(model, donor)
    ours, theirs = state(out)["lm_head.weight"], state(model)["lm_head.weight"]
    pairs = [("ĠcafÃ©", "▁café"), ("Ġthe", "▁the"), ("Ã", "<0xC3>"), ("<|endoftext|>", "</s>")]
    for donor_token, model_token in pairs:
        assert donor_token in donor_vocab and model_token in model_vocab
        assert torch.equal(ours[donor_vocab[donor_token]], theirs[model_vocab[model_token]]), donor_token
    counts = json.loads((out / "mergesmith_tokensurgeon.json").read_text())["tensors"]["lm_head.weight"]
    assert counts["byte"] > 0 and counts["exact"] > 0


def test_every_problem_at_once_before_any_weight(pair, tmp_path):
    model, donor = pair
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((donor / "config.json").read_text())
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError) as err:
        tokensurgeon(model, bare, tmp_path / "exists", quiet(k=0))
    text = str(err.value)
    assert "--k 0" in text and "exists; pass --overwrite" in text and "no tokenizer files" in text
    assert "no model weights found" in text
    with pytest.raises(InputError, match="share only .* tokens, fewer than --k 100000; lower --k"):
        tokensurgeon(model, donor, tmp_path / "out", quiet(k=100000))
    # mean and zero need only the donor's tokenizer and config, not its weights
    (bare / "tokenizer.json").write_bytes((donor / "tokenizer.json").read_bytes())
    (bare / "tokenizer_config.json").write_bytes((donor / "tokenizer_config.json").read_bytes())
    assert tokensurgeon(model, bare, tmp_path / "mean", quiet(approximation="mean")).out_dir.is_dir()


def test_a_failed_run_leaves_nothing(pair, tmp_path, monkeypatch):
    import mergesmith.vocab.transplant as transplant

    model, donor = pair

    def broken(*args, **kw):
        raise RuntimeError("stop")

    monkeypatch.setattr(transplant.CheckpointWriter, "commit", broken)
    with pytest.raises(RuntimeError, match="stop"):
        tokensurgeon(model, donor, tmp_path / "out", quiet(approximation="zero"))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_command_line(pair, tmp_path, capsys):
    model, donor = pair
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "out"), "--approximation", "zero",
                 "--no-progress"]) == 0
    assert "approximated (zero)" in capsys.readouterr().out
    assert main(["tokensurgeon", str(model), str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_dry_run_reads_no_weight_and_writes_nothing(pair, tmp_path, monkeypatch, capsys):
    from mergesmith.checkpoint.reader import Checkpoint

    model, donor = pair
    done = tokensurgeon(model, donor, tmp_path / "real", quiet())
    (tmp_path / "exists").mkdir()

    def refuse(*args, **kw):
        raise AssertionError("a dry run read a weight")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    planned = tokensurgeon(model, donor, tmp_path / "exists", quiet(dry_run=True))
    assert planned.report["dry_run"] and list((tmp_path / "exists").iterdir()) == []
    assert {k: v for k, v in planned.report.items() if k not in ("dry_run", "predicted_peak_bytes")} == \
        {**done.report, "model": str(model), "donor": str(donor)}
    # at least the rebuilt vocabulary matrices, which the run keeps whole until it writes them
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "real").glob("*.safetensors"))), "pt") as f:
        vocab_bytes = sum(f.get_slice(n).get_shape()[0] * f.get_slice(n).get_shape()[1] * 4
                          for n in planned.report["tensors"])
    assert planned.report["predicted_peak_bytes"] >= vocab_bytes
    assert main(["tokensurgeon", str(model), str(donor), str(tmp_path / "exists"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would write" in out and "predicted peak memory" in out
    assert list((tmp_path / "exists").iterdir()) == []
