"""The synthetic world and its skills: correct answers, disjoint splits, determinism."""

import re

import pytest

from mergesmith.zoo import skills as S

WORLD = S.make_world(0, n_countries=8, n_cities=60, n_people=60)


def test_world_is_deterministic_and_consistent():
    again = S.make_world(0, n_countries=8, n_cities=60, n_people=60)
    assert again == WORLD
    assert S.make_world(1, 8, 60, 60) != WORLD
    names = list(WORLD.countries) + list(WORLD.city_country) + list(WORLD.person_city)
    assert len(set(names)) == len(names)  # no entity shares a name
    assert set(WORLD.city_country.values()) <= set(WORLD.countries)
    assert set(WORLD.person_city.values()) <= set(WORLD.city_country)


@pytest.mark.parametrize("skill", list(S.SKILLS))
def test_examples_are_well_formed(skill):
    for ex in S.make_split(skill, WORLD, "test", 60, seed=0):
        assert ex.answer.startswith(" ") and ex.answer.strip()
        assert ex.choices[0] == ex.answer
        assert len(set(ex.choices)) == len(ex.choices) >= 2
        assert all(c.startswith(" ") for c in ex.choices)
        assert not ex.prompt.endswith(" ")  # the space belongs to the answer


@pytest.mark.parametrize("skill", [s for s in S.SKILLS if s != "facts"])
def test_splits_are_disjoint(skill):
    prompts = {split: {e.prompt for e in S.make_split(skill, WORLD, split, 150, seed=0)}
               for split in S.SPLITS}
    assert prompts["test"] and prompts["validation"] and prompts["train"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]


def test_fact_splits_are_disjoint_by_entity():
    test = {e.prompt for e in S.make_split("facts", WORLD, "test", 1000, 0)}
    train = {e.prompt for e in S.make_split("facts", WORLD, "train", 1000, 0)}
    assert test and train and not test & train
    assert len(test) + len(train) + len(WORLD.facts_in("validation")) == len(WORLD.facts())


def test_splits_are_deterministic():
    a = S.make_split("wordprob", WORLD, "test", 50, seed=3)
    b = S.make_split("wordprob", WORLD, "test", 50, seed=3)
    assert a == b


def _answers(skill, n=200):
    return S.make_split(skill, WORLD, "train", n, seed=1)


def test_arithmetic_answers_are_right():
    for ex in _answers("arithmetic") + _answers("wordprob_big"):
        if ex.prompt[0].isdigit():
            a, op, b = re.match(r"(\d+) ([+-]) (\d+) =", ex.prompt).groups()
        else:
            a, b = re.findall(r"\d+", ex.prompt)[:2]
            op = "+" if "more" in ex.prompt else "-"
        assert int(ex.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_string_answers_are_right():
    for ex in _answers("strings"):
        op, letters = re.match(r"(\w+): ([a-z ]+) =", ex.prompt).groups()
        letters = letters.split()
        want = {"reverse": letters[::-1], "sort": sorted(letters),
                "rotate": letters[1:] + letters[:1]}[op]
        assert ex.answer.split() == want


def test_rule_count_compare_answers_are_right():
    for ex in _answers("rule"):
        digits = [int(d) for d in ex.prompt.split(":")[1].strip(" =").split()]
        assert ex.answer == (" up" if digits[-1] > digits[0] else " down")
    for ex in _answers("count"):
        target, letters = re.match(r"count (\w): ([a-z ]+) =", ex.prompt).groups()
        assert int(ex.answer) == letters.split().count(target)
    for ex in _answers("compare"):
        values = [int(v) for v in ex.prompt[4:].strip(" =").split()]
        assert int(ex.answer) == max(values)


def test_passage_answers_follow_the_passage():
    for ex in _answers("passage", 300):
        passage, question = re.match(r"Passage: (.*) Question: (.*) Answer:", ex.prompt).groups()
        thing, value = re.match(r"Is (?:the )?(\w+) (?:in the )?(\w+)\?", question).groups()
        said = [s for s in passage.split(". ") if re.search(rf"\b{thing}\b", s)]
        assert len(said) == 1 and value in said[0]
        assert ex.answer == (" no" if " not " in said[0] else " yes"), ex.prompt


def test_heldout_answers_are_right():
    for ex in _answers("fact_passage"):
        city, country = re.match(r"Passage: \w+ works in (\w+)\. Question: Does \w+ work in (\w+)\?",
                                 ex.prompt).groups()
        assert ex.answer == (" yes" if WORLD.city_country[city] == country else " no")
    for ex in _answers("passage_math"):
        numbers = [int(v) for v in re.findall(r"\d+", ex.prompt)]
        value = numbers[0] + numbers[1] if "more" in ex.prompt else numbers[0] - numbers[1]
        assert ex.answer == (" yes" if value == numbers[2] else " no")


def test_answers_are_balanced():
    for skill in ("passage", "rule", "passage_math", "fact_passage"):
        answers = [e.answer for e in _answers(skill, 400)]
        share = answers.count(answers[0]) / len(answers)
        assert 0.35 < share < 0.65, skill


def test_pretraining_mixture_keeps_test_items_out():
    docs = S.pretraining_documents(WORLD, S.Mixture(), seed=0)
    corpus = {next(docs) for _ in range(3000)}
    for skill in S.PRACTICE_SKILLS:
        test = {e.prompt + e.answer for e in S.make_split(skill, WORLD, "test", 200, 0)}
        assert not test & corpus, skill
    # facts are told as statements, never asked as questions, in pretraining
    assert not any("Question: In which" in d for d in corpus)
    kinds = [("Passage" in d or "=" in d or "Answer:" in d) for d in corpus]
    assert 0.15 < sum(kinds) / len(kinds) < 0.5  # primer + practice share
