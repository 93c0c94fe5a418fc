"""tokenizer_source and tokenizer: against mergekit 0.1.5 on tiny families whose tokenizers differ.

mergekit orders the tokens it adds to the union by Python set and hash-map iteration (its
referenced models are a set, a fast tokenizer's vocabulary a Rust hash map), so which id an
added token gets can change from run to run when three or more models add tokens. The
comparison is therefore by token: the same tokens, and for every token the same row in every
vocabulary tensor. With one expert beside the base, mergekit's order is fixed and the ids are
compared too (docs/vocab.md, "Where mergesmith differs").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import mergesmith

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the suite's one way to run mergekit
from mergekit_ref import run_mergekit  # noqa: E402
from vocab_models import bpe_tokenizer, embeddings, vocab_family
from tiny_models import make_model

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A byte-level BPE base, two experts adding tokens (one shared, at different ids), and an expert
    whose tokenizer was trained on other text (a different ordinary vocabulary)."""
    root = tmp_path_factory.mktemp("vocab-family")
    base, (a, b) = vocab_family(root)
    other_tok = bpe_tokenizer(root / "other_tok", ["<tool>"], texts=["zebras quietly jog past xylophones"] * 9
                              + ["the cat"] * 3, vocab=290)
    other = make_model(root / "other", seed=7, layers=2, vocab=len(other_tok), base=base, tokenizer=False)
    other_tok.save_pretrained(other)
    return base, a, b, other


def linear(*models, **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(m)} for m in models],
            "parameters": {"weight": 1.0}, **extra}


def vocab_of(path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(path).get_vocab())


def same_rows_by_token(ours, theirs) -> None:
    """The same tokens, each with the same rows in every vocabulary tensor, the same config size."""
    vo, vm = vocab_of(ours), vocab_of(theirs)
    assert set(vo) == set(vm)
    eo, em = embeddings(ours), embeddings(theirs)
    assert set(eo) == set(em)
    tokens = sorted(vo)
    for name in eo:
        assert eo[name].shape == em[name].shape, name
        ours_rows = eo[name][torch.tensor([vo[t] for t in tokens])]
        theirs_rows = em[name][torch.tensor([vm[t] for t in tokens])]
        torch.testing.assert_close(ours_rows, theirs_rows, rtol=0, atol=0, msg=name)
    sizes = [json.loads((p / "config.json").read_text())["vocab_size"] for p in (ours, theirs)]
    assert sizes[0] == sizes[1] == eo["model.embed_tokens.weight"].shape[0]


def both(recipe: dict, tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "mergekit"
    with pytest.warns(UserWarning):  # the vocabulary note, at least
        mergesmith.merge(recipe, ours, progress=False)
    run_mergekit(recipe, theirs)
    return ours, theirs


def test_union_of_added_tokens_matches_mergekit(family, tmp_path):
    base, a, b, _ = family
    ours, theirs = both(linear(base, a, b, base_model=str(base), tokenizer_source="union"), tmp_path)
    same_rows_by_token(ours, theirs)
    vocab = vocab_of(ours)
    assert {"<tool>", "<math>", "<|im_start|>", "<|im_end|>"} <= set(vocab)
    assert len(vocab) == len(vocab_of(base)) + 4  # <|im_start|> once, though both experts add it


def test_union_ids_match_mergekit_with_one_expert(family, tmp_path):
    base, _, b, _ = family
    ours, theirs = both(linear(base, b, base_model=str(base), tokenizer_source="union"), tmp_path)
    assert vocab_of(ours) == vocab_of(theirs)
    eo, em = embeddings(ours), embeddings(theirs)
    for name in eo:
        assert torch.equal(eo[name], em[name]), name


def test_union_with_another_vocabulary_matches_mergekit(family, tmp_path):
    """Ordinary tokens only some models have: the donor, the base's row, and the average rules."""
    base, a, _, other = family
    ours, theirs = both(linear(base, a, other, base_model=str(base), tokenizer_source="union"), tmp_path)
    same_rows_by_token(ours, theirs)
    # without a base model, a token two models share and a third lacks is their average
    recipe = linear(a, other, b := family[2], tokenizer_source="union")
    ours, theirs = both(recipe, tmp_path / "no-base")
    same_rows_by_token(ours, theirs)


@pytest.mark.parametrize("source", ["base", "model"])
def test_base_and_model_sources_match_mergekit(family, tmp_path, source):
    base, a, b, _ = family
    tokenizer_source = "base" if source == "base" else str(b)
    ours, theirs = both(linear(base, a, b, base_model=str(base), tokenizer_source=tokenizer_source), tmp_path)
    assert vocab_of(ours) == vocab_of(theirs) == vocab_of(base if source == "base" else b)
    eo, em = embeddings(ours), embeddings(theirs)
    for name in eo:
        assert torch.equal(eo[name], em[name]), name


def test_forced_and_sourced_tokens_match_mergekit(family, tmp_path):
    base, a, b, _ = family
    ordinary = next(t for t in sorted(vocab_of(base)) if t.startswith("Ġ") and len(t) > 3)
    tokens = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(a), "token": "<tool>"}},
        "<math>": {"source": {"kind": "zero"}},
        ordinary: {"source": str(b), "force": True},
        "<|endoftext|>": {"source": {"kind": "zero"}, "force": True},
        "<brand_new>": {"source": {"kind": "model_token", "model": str(b), "token": "<math>"}},
        "<|im_end|>": {"source": {"kind": "model_token", "model": str(b), "token_id": 5}},
    }
    recipe = linear(base, a, b, base_model=str(base), tokenizer={"source": "union", "tokens": tokens,
                                                               "pad_to_multiple_of": 32})
    ours, theirs = both(recipe, tmp_path)
    vocab = vocab_of(ours)
    out = embeddings(ours)["model.embed_tokens.weight"]
    assert out.shape[0] % 32 == 0 and out.shape[0] > len(vocab)
    assert torch.equal(out[vocab["<|endoftext|>"]], torch.zeros(out.shape[1]))
    same_rows_by_token(ours, theirs)
    # The padding rows: each model's mean, then merged (compared by position: no token there). The
    # mean sums the same rows in id order, and mergekit's ids of the added tokens may be another
    # order, so the float32 sums agree to rounding only.
    theirs_emb = embeddings(theirs)["model.embed_tokens.weight"]
    torch.testing.assert_close(out[len(vocab):], theirs_emb[len(vocab):], rtol=1e-5, atol=1e-7)


def test_slices_match_mergekit(family, tmp_path):
    """passthrough slices: each vocabulary tensor from one model; tokens it lacks are zero in both."""
    _, a, b, _ = family
    recipe = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]}
    ours, theirs = both(recipe, tmp_path)
    same_rows_by_token(ours, theirs)


def test_tied_embeddings_match_mergekit(tmp_path_factory, tmp_path):
    base, (a, b) = vocab_family(tmp_path_factory.mktemp("tied"), tied=True)
    ours, theirs = both(linear(base, a, b, base_model=str(base), tokenizer_source="union"), tmp_path)
    assert set(embeddings(ours)) == {"model.embed_tokens.weight"}
    same_rows_by_token(ours, theirs)


def test_sentencepiece_union_matches_mergekit(tmp_path_factory, tmp_path):
    """SentencePiece inputs (tokenizer.model only): the same tokens and rows as mergekit, whose
    written tokenizer is a tokenizer.json (ours keeps tokenizer.model: docs/vocab.md)."""
    pytest.importorskip("sentencepiece")
    base, (a, b) = vocab_family(tmp_path_factory.mktemp("spm"), kind="sentencepiece")
    ours, theirs = both(linear(base, a, b, base_model=str(base), tokenizer_source="union"), tmp_path)
    same_rows_by_token(ours, theirs)
    assert (ours / "tokenizer.model").is_file() and not (theirs / "tokenizer.model").is_file()
