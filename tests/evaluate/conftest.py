"""Fixtures for the evaluation tests; the data and builders live in eval_data.py."""

import pytest

from eval_data import CHAT_TEMPLATE, GEN_ROWS, MC_ROWS, build_model, build_tokenizer, write_jsonl


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return build_model(tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, tiny_model):
    """A saved model folder with its tokenizer beside it, as `mergesmith evaluate` expects."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def mc_file(tmp_path):
    return write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)


@pytest.fixture
def gen_file(tmp_path):
    return write_jsonl(tmp_path / "gen.jsonl", GEN_ROWS)
