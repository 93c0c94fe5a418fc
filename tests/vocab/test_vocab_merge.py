"""The output of a merge with a tokenizer: it loads and encodes as the union, keeps the inputs'
tokenizer form, streams its vocabulary tensors in row blocks, and bad recipes are refused whole."""

from __future__ import annotations

import json

import pytest
import torch

import mergesmith
from mergesmith.api import plan_merge
from mergesmith.engine.merge_plan import row_spans
from mergesmith.engine.options import MergeOptions
from mergesmith.errors import InputError
from mergesmith.vocab.union import RowMap
from vocab_models import embeddings, vocab_family
from tiny_models import make_model


def linear(*models, **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(m)} for m in models],
            "parameters": {"weight": 1.0}, **extra}


def merge(recipe, out, **options):
    with pytest.warns(UserWarning, match="vocabulary: "):
        mergesmith.merge(recipe, out, progress=False, **options)
    return out


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return vocab_family(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    return vocab_family(tmp_path_factory.mktemp("spm"), kind="sentencepiece")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return vocab_family(tmp_path_factory.mktemp("gpt2"), kind="gpt2")


@pytest.mark.parametrize("kind", ["bpe", "spm", "gpt2"])
def test_union_output_loads_and_encodes_added_tokens_as_one_id(request, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, (a, b) = request.getfixturevalue(kind)
    out = merge(linear(base, a, b, base_model=str(base), tokenizer_source="union"), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.config.vocab_size
    for expert in (a, b):
        theirs = AutoTokenizer.from_pretrained(expert)
        for token in ("<tool>", "<math>", "<|im_start|>", "<|im_end|>"):
            if token not in theirs.get_vocab():
                continue
            ids = tok.encode(f"the cat{token}sat", add_special_tokens=False)
            assert tok.convert_tokens_to_ids(token) in ids
            assert tok.decode([tok.convert_tokens_to_ids(token)]) == token
    ids = tok("<tool> the cat <|im_end|>", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)
    files = {p.name for p in out.iterdir()}
    # the form the inputs had: SentencePiece keeps tokenizer.model and writes no tokenizer.json
    # GPT-2's file form keeps vocab.json and merges.txt and gets no tokenizer.json
    form = {"spm": {"tokenizer.model"}, "gpt2": {"vocab.json", "merges.txt"}}.get(kind, {"tokenizer.json"})
    assert form <= files and (kind == "bpe" or "tokenizer.json" not in files)


def test_sentencepiece_union_loads_as_a_sentencepiece_tokenizer(spm, tmp_path):
    from transformers import AutoTokenizer

    base, (a, b) = spm
    out = merge(linear(base, a, b, base_model=str(base), tokenizer_source="union"), tmp_path / "out")
    slow = AutoTokenizer.from_pretrained(out, backend="sentencepiece")
    fast = AutoTokenizer.from_pretrained(out)
    text = "the cat <tool> sat <|im_end|> on the mat"
    assert slow.encode(text) == fast.encode(text)
    assert slow.convert_tokens_to_ids("<|im_end|>") == fast.convert_tokens_to_ids("<|im_end|>") >= 60


def test_vocabulary_tensors_stream_in_row_blocks_as_they_merge_whole(bpe, tmp_path):
    """A tiny chunk budget puts the embeddings in blocks of a few rows, gathered by index; the result
    is the whole-tensor merge's, bit for bit, padding rows (a float64 mean) to rounding."""
    base, (a, b) = bpe
    recipe = linear(base, a, b, base_model=str(base), tokenizer={"source": "union", "pad_to_multiple_of": 64})
    whole = embeddings(merge(recipe, tmp_path / "whole", chunk_bytes=0))
    blocks = embeddings(merge(recipe, tmp_path / "blocks", chunk_bytes=3 * 16 * 4 * 7))
    tokens = len(json.loads((tmp_path / "whole" / "tokenizer.json").read_text())["model"]["vocab"]) + 4
    for name in whole:
        assert torch.equal(whole[name][:tokens], blocks[name][:tokens]), name
        torch.testing.assert_close(whole[name][tokens:], blocks[name][tokens:], rtol=1e-6, atol=1e-7)
    plan = plan_merge(recipe, MergeOptions(chunk_bytes=3 * 16 * 4 * 7))
    emb = next(t for t in plan.tensors if t.vocab is not None)
    assert len(row_spans(plan, emb, 3 * 16 * 4 * 7)) > 10


@pytest.mark.parametrize("piece", [4096, 1])
def test_row_map_gathers_by_index(monkeypatch, piece):
    """Hand-computed: two inputs of three rows each on a four-token vocabulary plus two padding rows.
    Token 2 only input 1 has (the donor's row for input 0); token 3 neither (zero). Gathered at once,
    and one row at a time."""
    monkeypatch.setattr("mergesmith.vocab.union.GATHER_ROWS", piece)
    stored = [torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[10.0], [20.0], [30.0]])]
    take = [torch.tensor([2, 0, -1, -1]), torch.tensor([1, 0, 2, -1])]
    row_map = RowMap(6, 4, take, [(2, [(1, 2)]), (3, [])])
    assert row_map.block(0, stored, 0, 6, torch.float32).flatten().tolist() == [3, 1, 30, 0, 8.5, 8.5]
    assert row_map.block(1, stored, 0, 6, torch.float32).flatten().tolist() == [20, 10, 30, 0, 15, 15]
    fresh = RowMap(6, 4, take, [(2, [(1, 2)]), (3, [])])
    assert fresh.block(0, stored, 3, 6, torch.float32, chunk_rows=1).flatten().tolist() == [0, 8.5, 8.5]


def test_a_wide_vocabulary_costs_its_rows_not_a_square(tmp_path):
    """A 2**20-row permutation: gathering a block reads only that block's rows, and nothing the size of
    a vocabulary-by-vocabulary matrix (which would be 4 TiB here) is ever made."""
    n = 2 ** 20
    stored = [torch.arange(n, dtype=torch.float32).unsqueeze(1)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    row_map = RowMap(n, n, [perm], [])
    got = row_map.block(0, stored, 1000, 1010, torch.float32)
    assert got.flatten().tolist() == perm[1000:1010].float().tolist()


def test_every_tokenizer_problem_at_once_before_any_weight(bpe, tmp_path):
    base, (a, b) = bpe
    bare = make_model(tmp_path / "bare", seed=5, layers=2, vocab=300, tokenizer=False)
    recipe = linear(base, a, bare, base_model=str(base), tokenizer={
        "source": "union", "pad_to_multiple_of": 0,
        "tokens": {"<x>": {"source": str(tmp_path / "nowhere")},
                   "<y>": {"force": True},
                   "<z>": {"source": {"kind": "model_token", "model": str(a), "token": "t", "token_id": 3}},
                   "<w>": {"source": 5}}})
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, tmp_path / "out", progress=False)
    text = "\n".join(err.value.problems)
    for needle in ("pad_to_multiple_of = 0", "tokens['<x>'].source names", "tokens['<y>'].force is true",
                   "tokens['<z>'].source", "tokens['<w>'].source = 5"):
        assert needle in text, text
    assert not (tmp_path / "out").exists()
    # the recipe fixed, a model without a tokenizer is named (read before any weight)
    with pytest.raises(InputError, match="bare: no tokenizer files"):
        mergesmith.merge(linear(base, a, bare, base_model=str(base), tokenizer_source="union"), tmp_path / "out",
                         progress=False)
    both = linear(base, a, tokenizer_source="union", tokenizer={"source": "base"})
    with pytest.raises(InputError, match="not both"):
        mergesmith.merge(both, tmp_path / "out", progress=False)
    missing = linear(base, a, base_model=str(base), tokenizer={"tokens": {"<q>": {"source": {
        "kind": "model_token", "model": str(a), "token": "<nope>"}}}})
    with pytest.raises(InputError, match="has no token '<nope>'"):
        mergesmith.merge(missing, tmp_path / "out", progress=False)


def test_statistics_with_moved_rows_are_refused_before_calibrating(bpe, tmp_path):
    """Fisher's statistics lie in each model's own row order; with rows moved by token they would be
    merged against the wrong rows, so the plan refuses them (no model is run)."""
    base, (a, b) = bpe
    data = tmp_path / "cal.jsonl"
    data.write_text(json.dumps({"id": "g0", "type": "generation", "prompt": "the cat", "references": ["sat"]}) + "\n")
    recipe = {"merge_method": "fisher", "models": [{"model": str(a)}, {"model": str(b)}],
              "calibration": {"files": [str(data)], "cache_dir": str(tmp_path / "cache")},
              "tokenizer_source": "union"}
    with pytest.raises(InputError, match="statistics are not aligned by token yet"):
        mergesmith.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "cache").exists()


def test_dry_run_shows_rows_by_token_and_the_vocabulary(bpe, tmp_path, capsys):
    import yaml

    from mergesmith.cli import main

    base, (a, b) = bpe
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear(base, a, b, base_model=str(base), tokenizer_source="union")))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "[rows by token]" in text and "vocabulary: union of the tokenizers, 304 tokens" in text
    assert "model.embed_tokens.weight" in text and "[304, 16]" in text
    assert not (tmp_path / "out").exists()
