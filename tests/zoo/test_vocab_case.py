"""The zoo's vocabulary case (zoo/vocab.py) and its bench rows (``--vocab``, zoo/bench_vocab.py) on the
test-size zoo. The two experts are built once per session; the bench's grid is cut to two points."""

import json

import pytest

from mergesmith.errors import InputError
from mergesmith.zoo import bench as BN
from mergesmith.zoo import bench_vocab as BV
from mergesmith.zoo import vocab as V


@pytest.fixture(scope="session")
def vocab_experts(zoo):
    return V.build_vocab_experts(zoo, progress=False)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_the_experts_load_with_tokenizers_of_their_own(zoo, vocab_experts):
    from transformers import AutoModelForCausalLM

    base = _tokenizer(zoo.base)
    added, retokenized = _tokenizer(vocab_experts["added"]), _tokenizer(vocab_experts["retokenized"])
    words = json.loads((vocab_experts["added"] / "zoo_train.json").read_text())["added_tokens"]
    assert len(words) == V.ADDED_TOKENS and len(added) == len(base) + V.ADDED_TOKENS
    assert all(w in added.get_vocab() and w not in base.get_vocab() for w in words)
    assert all(len(added(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    assert len(retokenized) == V.vocab_settings(V.get_size(zoo.size))["retokenized_vocab"] != len(base)
    for kind, tokenizer in (("added", added), ("retokenized", retokenized)):
        model = AutoModelForCausalLM.from_pretrained(vocab_experts[kind])
        rows = model.get_input_embeddings().weight.shape[0]
        assert rows == len(tokenizer) == _config(vocab_experts[kind])["vocab_size"]


def test_the_experts_are_cached(zoo, vocab_experts):
    stamps = {k: (p / "model.safetensors").stat().st_mtime_ns for k, p in vocab_experts.items()}
    again = V.build_vocab_experts(zoo, progress=False)
    assert again == vocab_experts
    assert {k: (p / "model.safetensors").stat().st_mtime_ns for k, p in again.items()} == stamps


def test_an_expert_rebuilt_is_the_same(zoo, vocab_experts, tmp_path):
    """Seeded by the world and fine-tune seeds: the same words, the same weights (same threads)."""
    spec = V.get_size(zoo.size)
    V.build_added(tmp_path, zoo.base, spec, zoo.seed, zoo.finetune_seed, progress=False)
    cached = vocab_experts["added"]
    assert _tokenizer(tmp_path).get_vocab() == _tokenizer(cached).get_vocab()
    assert (tmp_path / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()


def test_a_new_row_is_the_mean_of_its_pieces():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<e>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4}
    backend = Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<e>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=False))
    before = model.get_input_embeddings().weight.detach().clone()
    V.add_tokens(model, tokenizer, [" ab"])
    row = model.get_input_embeddings().weight[5]
    assert torch.allclose(row, before[[4, 1, 2]].mean(dim=0))
    assert tokenizer(" ab", add_special_tokens=False)["input_ids"] == [5]


def test_union_keeps_the_added_tokens_and_base_does_not(zoo, vocab_experts, tmp_path):
    base_vocab = _tokenizer(zoo.base).get_vocab()
    words = json.loads((vocab_experts["added"] / "zoo_train.json").read_text())["added_tokens"]
    point = {"lambda": 0.5}
    union = BV.merged_model(BV.vocab_recipe(zoo, vocab_experts, "union", point, 0), tmp_path / "union", "cpu")
    base = BV.merged_model(BV.vocab_recipe(zoo, vocab_experts, "base", point, 0), tmp_path / "base", "cpu")
    union_vocab, restricted = _tokenizer(union).get_vocab(), _tokenizer(base).get_vocab()
    assert all(w in union_vocab for w in words) and not any(w in restricted for w in words)
    assert restricted == base_vocab and _config(base)["vocab_size"] == len(base_vocab)
    assert _config(union)["vocab_size"] == len(union_vocab) > len(base_vocab)


@pytest.mark.parametrize("approximation", BV.APPROXIMATIONS)
def test_the_surgeon_gives_the_expert_the_retokenized_vocabulary(zoo, vocab_experts, tmp_path, approximation):
    donor = V.vocab_folders(zoo)["donor"]
    out = BV.surgeon_model(zoo.experts[V.RETOKENIZED_SKILL], donor, approximation, tmp_path / "out")
    assert _config(out)["vocab_size"] == _config(vocab_experts["retokenized"])["vocab_size"]
    assert _tokenizer(out).get_vocab() == _tokenizer(vocab_experts["retokenized"]).get_vocab()
    assert _config(out)["vocab_size"] != _config(zoo.base)["vocab_size"]


def test_bench_adds_the_vocab_rows(zoo, zoo_cache, vocab_experts, tmp_path, monkeypatch):
    monkeypatch.setitem(BN.GRIDS, BV.VOCAB_METHOD, [{"lambda": 0.5}, {"lambda": 1.0}])
    cfg = BN.BenchConfig(out=tmp_path, size="test", seeds=(0,), methods=("linear",), cache=zoo_cache, limit=4,
                         val_limit=3, generation=False, progress=False,
                         extra_rows=(BV.VocabRows(BV.parse_vocab_rows("all")),))
    BN.run_bench(cfg, log=lambda msg: None)
    result = json.loads((tmp_path / "results.json").read_text())["seeds"][0]
    scores = result["scores"]
    expected = {f"vocab-expert:added:{V.ADDED_SKILL}", f"vocab-expert:retokenized:{V.RETOKENIZED_SKILL}",
                "vocab-merge:union", "vocab-merge:base", "vocab-merge:shared",
                "surgeon:omp", "surgeon:mean", "surgeon:zero"}
    assert expected <= set(scores)
    assert all(set(scores[row]["mc"]) == set(scores["base"]["mc"]) for row in expected)  # every skill
    assert all(0.0 <= v <= 1.0 for row in expected for v in scores[row]["mc"].values())
    for name in ("vocab-merge:union", "vocab-merge:base", "vocab-merge:shared"):
        assert len(result["validation"][name]) == 2  # chosen on validation
    table = (tmp_path / "table.md").read_text()
    assert "## Vocabulary rows" in table and "| vocab-merge:union |" in table and "| surgeon:omp |" in table
    assert not (tmp_path / "work" / "extra-rows" / "seed0" / "vocab-merge-union").exists()  # evaluated, removed


def test_vocab_rows_are_checked_by_name():
    assert BV.parse_vocab_rows("all") == BV.VOCAB_ROWS
    assert BV.parse_vocab_rows("union, surgeon") == ("union", "surgeon")
    with pytest.raises(InputError, match="onion, cut not a vocabulary row"):
        BV.parse_vocab_rows("onion,surgeon,cut")


def test_the_section_keeps_accuracy_per_seed_over_seeds():
    skill, trained, heldout = V.RETOKENIZED_SKILL, (V.RETOKENIZED_SKILL, "arithmetic"), ("rule_long",)

    def seed(i: int, expert: float, surgeon: float) -> BN.SeedResult:
        def row(own: float) -> dict:
            return {"mc": {skill: own, "arithmetic": 0.5, "rule_long": 0.25}}
        scores = {f"vocab-expert:retokenized:{skill}": row(0.8), "surgeon:omp": row(surgeon),
                  f"expert:{skill}": row(expert), "expert:arithmetic": row(0.9)}
        return BN.SeedResult(seed=i, zoo_root="", scores=scores)

    lines = BV.vocab_section([seed(0, 0.8, 0.4), seed(1, 0.5, 0.5)], trained, heldout, generation=False)
    assert "| surgeon:omp | 0.750 ± 0.354 | 0.450 ± 0.071 |" in lines  # (0.5 + 1.0) / 2, not 0.9 / 1.3
    own = "0.800 ± 0.000 | 0.650 ± 0.212"  # the expert's own skill, and the ordinary expert's
    assert f"| vocab-expert:retokenized:{skill} | 0.650 ± 0.000 | 0.250 ± 0.000 | {own} |" in lines
    zero = BV.vocab_section([seed(0, 0.0, 0.3)], trained, heldout, generation=False)
    assert "| surgeon:omp | - | 0.300 |" in zero  # nothing kept of a score of zero
    assert BV.vocab_section([BN.SeedResult(seed=0, zoo_root="", scores={"base": {}})], trained, heldout, False) == []
