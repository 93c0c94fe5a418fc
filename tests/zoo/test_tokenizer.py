"""The zoo tokenizer: lossless, digit by digit, and consistent with multiple-choice scoring."""

import itertools
import random

from transformers import AutoTokenizer

from mergesmith.zoo import skills as S
from mergesmith.zoo.tokenizer import train_tokenizer

WORLD = S.make_world(0, 8, 40, 40)


def _tokenizer(tmp_path):
    docs = S.pretraining_documents(WORLD, S.Mixture(), 0)
    tok = train_tokenizer(itertools.islice(docs, 1500), vocab_size=384)
    tok.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def test_tokenizer_round_trip_and_prefix(tmp_path):
    tok = _tokenizer(tmp_path)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    rng = random.Random(0)
    for skill in S.SKILLS:
        for _ in range(20):
            ex = S.sample(skill, rng, WORLD, "test")
            for choice in ex.choices:
                ids = tok(ex.prompt + choice)["input_ids"]
                assert tok.decode(ids) == ex.prompt + choice
                prompt_ids = tok(ex.prompt)["input_ids"]
                # the prompt's tokens are a prefix: scoring a choice scores only the choice
                assert ids[:len(prompt_ids)] == prompt_ids, (skill, ex.prompt, choice)


def test_digits_are_single_tokens(tmp_path):
    tok = _tokenizer(tmp_path)
    pieces = tok.convert_ids_to_tokens(tok("1234 + 56 = 1290")["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234561290")
