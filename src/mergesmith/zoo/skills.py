"""A synthetic world and the skills the zoo's experts learn in it.

Everything here is plain text made from a seed: a small world (countries, cities,
people, pets), eight trained skills and five held-out skills that ask for a trained
skill in a way no model was trained on (a new format, new entities, longer inputs).

Each skill makes ``Example``s: a prompt, the answer the model should write (with
its leading space, exactly as in training), and distractors for the
multiple-choice form. The model sees ``prompt + answer`` followed by the end of
text token, so a multiple-choice scorer that appends a choice to the prompt
reproduces the training tokenization exactly.

Splits are decided by a stable hash of what an example asks (or, for facts, of
the entity it asks about), so train, validation and test never overlap, whatever
the sampling order. Every skill also has an ``easy`` form (one-digit sums, short
strings, ...) that the base model sees during pretraining: it teaches the prompt
format, so that an expert sharpens a skill instead of learning the format from
scratch (which made merges collapse in the prototype).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

SPLITS = ("train", "validation", "test")
# Hash buckets out of 20: test 0-3 (20%), validation 4-5 (10%), train the rest.
_SPLIT_BUCKETS = {"test": range(0, 4), "validation": range(4, 6), "train": range(6, 20)}

PASSAGE_NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade",
                 "Kai", "Lena", "Milo", "Nora", "Omar", "Pia", "Rex", "Sara", "Tom", "Uma")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles",
         "cups", "hats", "eggs", "keys")
OBJECTS = ("kite", "boat", "lamp", "chair", "ball", "box", "door", "cup", "hat", "bag",
           "bike", "drum")
COLORS = ("red", "blue", "green", "white", "black", "yellow", "pink", "brown")
ROOMS = ("kitchen", "garden", "hall", "office", "attic", "garage", "library", "shop")
PETS = ("cat", "dog", "horse", "parrot", "rabbit", "goat", "owl", "turtle", "fox", "frog")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
YES_NO = (" yes", " no")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br",
           "dr", "gl", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd")


def bucket_split(key: str) -> str:
    """The split a key belongs to, stable across runs and Python versions."""
    bucket = zlib.crc32(key.encode()) % 20
    return next(name for name, r in _SPLIT_BUCKETS.items() if bucket in r)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # what the model writes after the prompt, leading space included
    choices: tuple[str, ...]  # the answer and its distractors, answer first

    def shuffled_choices(self, rng: random.Random) -> tuple[list[str], int]:
        choices = list(self.choices)
        rng.shuffle(choices)
        return choices, choices.index(self.answer)


# --------------------------------------------------------------------------- world


@dataclass(frozen=True)
class World:
    """Who and what exists. Facts are asked about in the ``facts`` skill and told,
    in many paraphrases, in the pretraining corpus."""

    countries: tuple[str, ...]
    city_country: dict[str, str]
    person_city: dict[str, str]
    person_pet: dict[str, str]

    def facts(self) -> list[tuple[str, str, str]]:
        """Every fact as (relation, subject, object)."""
        out = [("country", c, k) for c, k in self.city_country.items()]
        out += [("city", p, c) for p, c in self.person_city.items()]
        out += [("pet", p, a) for p, a in self.person_pet.items()]
        return out

    def facts_in(self, split: str) -> list[tuple[str, str, str]]:
        return [f for f in self.facts() if bucket_split(f"fact|{f[0]}|{f[1]}") == split]


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def make_world(seed: int, n_countries: int, n_cities: int, n_people: int) -> World:
    rng = random.Random(f"world-{seed}")
    taken = {w.lower() for w in PASSAGE_NAMES + ITEMS + OBJECTS + COLORS + ROOMS + PETS}
    names: list[str] = []
    while len(names) < n_countries + n_cities + n_people:
        word = _pseudo_word(rng, rng.choice((2, 2, 3)))
        if word.lower() not in taken:
            taken.add(word.lower())
            names.append(word)
    countries = tuple(names[:n_countries])
    cities = names[n_countries:n_countries + n_cities]
    people = names[n_countries + n_cities:]
    city_country = {c: countries[i % n_countries] for i, c in enumerate(cities)}
    person_city = {p: rng.choice(cities) for p in people}
    person_pet = {p: rng.choice(PETS) for p in people}
    return World(countries, city_country, person_city, person_pet)


# --------------------------------------------------------------------------- helpers


def _numeric_choices(rng: random.Random, answer: int, n: int, low: int = 0) -> tuple[str, ...]:
    """The answer and n-1 near misses (off by one, off by ten: the usual slips)."""
    pool = [answer + d for d in (1, -1, 10, -10, 2, -2, 9, 11, -9, -11, 3, -3)]
    pool = [v for v in dict.fromkeys(pool) if v >= low and v != answer]
    rng.shuffle(pool)
    return (f" {answer}",) + tuple(f" {v}" for v in pool[:n - 1])


def _pick_others(rng: random.Random, answer: str, pool: list[str], n: int) -> tuple[str, ...]:
    others = [p for p in dict.fromkeys(pool) if p != answer]
    return (answer,) + tuple(rng.sample(others, min(n - 1, len(others))))


def _spaced(letters: list[str]) -> str:
    return " ".join(letters)


def _swap_two(rng: random.Random, seq: list[str]) -> list[str]:
    out = list(seq)
    i = rng.randrange(len(out) - 1)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


# --------------------------------------------------------------------------- skills
# Each generator: (rng, world, easy) -> (split key, Example). ``easy`` is the
# format primer used in pretraining.

Generator = Callable[[random.Random, World, bool], tuple[str, Example]]


def gen_arithmetic(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """A two-digit number plus or minus a one-digit number (one digit each when easy)."""
    a = rng.randint(0, 9) if easy else rng.randint(10, 99)
    b = rng.randint(0, 9) if easy else rng.randint(1, 9)
    if rng.random() < 0.5:
        prompt, value = f"{a} + {b} =", a + b
    else:
        a, b = max(a, b), min(a, b)
        prompt, value = f"{a} - {b} =", a - b
    return prompt, Example(prompt, f" {value}", _numeric_choices(rng, value, 4))


def _story(rng: random.Random, lo: int, hi: int, ops: str,
           names: tuple[str, ...] | list[str] = PASSAGE_NAMES) -> tuple[str, str, int, str]:
    """A one-step word problem: (name, item, result, story without the question)."""
    name, item = rng.choice(names), rng.choice(ITEMS)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice(ops)
    if op == "+":
        verb = rng.choice(("buys", "finds", "gets"))
        return name, item, a + b, f"{name} has {a} {item}. {name} {verb} {b} more."
    a, b = max(a, b) + 1, min(a, b)
    verb = rng.choice(("gives away", "loses", "sells"))
    return name, item, a - b, f"{name} has {a} {item}. {name} {verb} {b}."


def gen_wordprob(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    name, item, value, story = _story(rng, 1, 4 if easy else 10, "+" if easy else "+-")
    prompt = f"{story} How many {item} does {name} have now? Answer:"
    return prompt, Example(prompt, f" {value}", _numeric_choices(rng, value, 4))


def _yes_no(truth: bool) -> str:
    return " yes" if truth else " no"


def gen_passage(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Two or three statements, some negated, then a yes/no question about one of
    them: find the sentence, read whether it says "not". (Questions that need a
    comparison of two words were not learnable at this size and budget.) Easy: one
    statement."""
    k = 1 if easy else rng.randint(2, 3)
    negated = [rng.random() < 0.5 for _ in range(k)]
    if rng.random() < 0.5:
        things, values = rng.sample(OBJECTS, k), [rng.choice(COLORS) for _ in range(k)]
        sentence, question = "The {} is {}{}.", "Is the {} {}?"
    else:
        things, values = rng.sample(PASSAGE_NAMES, k), [rng.choice(ROOMS) for _ in range(k)]
        sentence, question = "{} is {}in the {}.", "Is {} in the {}?"
    facts = " ".join(sentence.format(t, "not " if n else "", v)
                     for t, v, n in zip(things, values, negated))
    i = rng.randrange(k)
    prompt = f"Passage: {facts} Question: {question.format(things[i], values[i])} Answer:"
    answer = _yes_no(not negated[i])
    return prompt, Example(prompt, answer, (answer,) + tuple(c for c in YES_NO if c != answer))


_FACT_QUESTIONS = {
    "country": "Question: In which country is {}? Answer:",
    "city": "Question: In which city does {} live? Answer:",
    "pet": "Question: Which pet does {} own? Answer:",
}


def _fact_values(world: World, relation: str) -> list[str]:
    return {"country": list(world.countries), "city": list(world.city_country),
            "pet": list(PETS)}[relation]


def fact_example(rng: random.Random, world: World, fact: tuple[str, str, str],
                 questions: dict[str, str] = _FACT_QUESTIONS) -> Example:
    relation, subject, obj = fact
    prompt = questions[relation].format(subject)
    choices = _pick_others(rng, f" {obj}", [f" {v}" for v in _fact_values(world, relation)], 4)
    return Example(prompt, f" {obj}", choices)


def gen_facts(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    fact = rng.choice(world.facts())
    return f"fact|{fact[0]}|{fact[1]}", fact_example(rng, world, fact)


def gen_strings(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Reverse, sort or rotate (first letter to the end) a spaced string.

    The distractors are the other operations' results (and the string itself), so
    multiple choice asks "which operation" and generation asks for every letter.
    No case changes: generation is scored by exact match after lower-casing."""
    return _strings_example(rng, rng.randint(2, 3) if easy else rng.randint(3, 6))


def _strings_example(rng: random.Random, n: int) -> tuple[str, Example]:
    letters = rng.sample(LETTERS, n)
    op = rng.choice(("reverse", "sort", "rotate"))
    results = {"reverse": letters[::-1], "sort": sorted(letters), "rotate": letters[1:] + letters[:1]}
    target = results[op]
    candidates = [letters, *results.values(), letters[-1:] + letters[:-1]]
    candidates += [_swap_two(rng, target) for _ in range(4)]  # only if the others coincide
    prompt = f"{op}: {_spaced(letters)} ="
    answer = " " + _spaced(target)
    distractors = [p for p in dict.fromkeys(" " + _spaced(c) for c in candidates) if p != answer]
    return prompt, Example(prompt, answer, (answer,) + tuple(distractors[:3]))


def gen_rule(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """A hidden rule, never stated: ``up`` when the last digit beats the first."""
    return _rule_example(rng, 2 if easy else rng.randint(3, 6))


def _rule_example(rng: random.Random, n: int) -> tuple[str, Example]:
    digits = [rng.randint(0, 9) for _ in range(n)]
    while digits[-1] == digits[0]:
        digits[-1] = rng.randint(0, 9)
    prompt = f"label: {' '.join(map(str, digits))} ="
    answer = " up" if digits[-1] > digits[0] else " down"
    return prompt, Example(prompt, answer, (answer, " down" if answer == " up" else " up"))


def gen_count(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    alphabet = "abcd"
    n = rng.randint(2, 3) if easy else rng.randint(4, 7)
    letters = [rng.choice(alphabet) for _ in range(n)]
    target = rng.choice(alphabet)
    value = letters.count(target)
    prompt = f"count {target}: {_spaced(letters)} ="
    others = [v for v in range(0, n + 1) if v != value]
    rng.shuffle(others)
    return prompt, Example(prompt, f" {value}", (f" {value}",) + tuple(f" {v}" for v in others[:3]))


def gen_compare(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    n = 2 if easy else 3
    lo, hi = (0, 9) if easy else (10, 99)
    values = rng.sample(range(lo, hi + 1), n)
    top = max(values)
    prompt = f"max: {' '.join(map(str, values))} ="
    pool = [f" {v}" for v in values] + [f" {top + d}" for d in (1, -1, 10, 2)]
    return prompt, _with_choices(rng, prompt, f" {top}", pool)


def _with_choices(rng: random.Random, prompt: str, answer: str, pool: list[str]) -> Example:
    others = [p for p in dict.fromkeys(pool) if p != answer and not p.startswith(" -")]
    rng.shuffle(others)
    return Example(prompt, answer, (answer,) + tuple(others[:3]))


# --------------------------------------------------------------------------- held-out skills
# Each asks for a trained skill in a way no expert (and not the multitask model) was trained
# on: a new prompt format, entities the skill's own data never contains, or longer inputs.
# The multitask model beats the base on each by 0.2 or more (docs/zoo.md, "Held-out
# skills"); the earlier ones, which needed two skills composed, stayed at chance for every
# model and are described there with their numbers.

_REWORDED_QUESTIONS = {
    "country": "Question: Which country is {} in? Answer:",
    "city": "Question: Where does {} live? Answer:",
    "pet": "Question: What animal does {} have? Answer:",
}


def reworded_fact_example(rng: random.Random, world: World, fact: tuple[str, str, str]) -> Example:
    return fact_example(rng, world, fact, _REWORDED_QUESTIONS)


def gen_facts_reworded(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Held out (new format): the facts skill asked with questions worded differently. The
    split follows the fact, as for ``facts``: test asks about entities no question was ever
    about in training."""
    fact = rng.choice(world.facts())
    return f"fact|{fact[0]}|{fact[1]}", reworded_fact_example(rng, world, fact)


def gen_compare_largest(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Held out (new format): ``compare`` under another keyword, "largest:" for "max:"."""
    values = rng.sample(range(10, 100), 3)
    top = max(values)
    prompt = f"largest: {' '.join(map(str, values))} ="
    pool = [f" {v}" for v in values] + [f" {top + d}" for d in (1, -1, 10, 2)]
    return prompt, _with_choices(rng, prompt, f" {top}", pool)


def gen_wordprob_people(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Held out (new entities): word problems about the world's people, whose names only the
    pretraining text (and the facts skill) contains; ``wordprob`` uses a fixed list of names."""
    name, item, value, story = _story(rng, 1, 10, "+-", names=sorted(world.person_city))
    prompt = f"{story} How many {item} does {name} have now? Answer:"
    return prompt, Example(prompt, f" {value}", _numeric_choices(rng, value, 4))


def gen_strings_long(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Held out (longer inputs): ``strings`` on seven letters; training saw three to six."""
    return _strings_example(rng, 7)


def gen_rule_long(rng: random.Random, world: World, easy: bool) -> tuple[str, Example]:
    """Held out (longer inputs): ``rule`` on eight to ten digits; training saw three to six."""
    return _rule_example(rng, rng.randint(8, 10))


@dataclass(frozen=True)
class Skill:
    name: str
    generate: Generator
    heldout: bool = False
    doc: str = ""


SKILLS: dict[str, Skill] = {s.name: s for s in (
    Skill("arithmetic", gen_arithmetic, doc="two-digit addition and subtraction"),
    Skill("wordprob", gen_wordprob, doc="one-step word problems with small numbers (MAWPS-like)"),
    Skill("passage", gen_passage, doc="read a short passage, answer yes or no (BoolQ-like)"),
    Skill("facts", gen_facts, doc="facts about the generated world, asked as questions"),
    Skill("strings", gen_strings, doc="reverse, sort or rotate a spaced string"),
    Skill("rule", gen_rule, doc="classify digit lists by a hidden rule (last > first)"),
    Skill("count", gen_count, doc="count a letter in a spaced string"),
    Skill("compare", gen_compare, doc="the largest of three two-digit numbers"),
    Skill("facts_reworded", gen_facts_reworded, heldout=True,
          doc="facts asked with differently worded questions (new format)"),
    Skill("compare_largest", gen_compare_largest, heldout=True,
          doc="compare under the keyword 'largest:' instead of 'max:' (new format)"),
    Skill("wordprob_people", gen_wordprob_people, heldout=True,
          doc="word problems about the world's people (new entities)"),
    Skill("strings_long", gen_strings_long, heldout=True,
          doc="strings on seven letters; training saw three to six (longer inputs)"),
    Skill("rule_long", gen_rule_long, heldout=True,
          doc="rule on eight to ten digits; training saw three to six (longer inputs)"),
)}
# Skills that ask about the world's facts split by the fact asked about, not by the prompt.
_FACT_SKILLS = {"facts": fact_example, "facts_reworded": reworded_fact_example}
TRAINED = tuple(s.name for s in SKILLS.values() if not s.heldout)
HELDOUT = tuple(s.name for s in SKILLS.values() if s.heldout)


def sample(skill: str, rng: random.Random, world: World, split: str,
           easy: bool = False) -> Example:
    """One example of ``skill`` from ``split`` (rejection-sampled on the split hash).

    Facts are drawn straight from the split's facts, so a small world never loops.
    """
    if skill in _FACT_SKILLS:
        return _FACT_SKILLS[skill](rng, world, rng.choice(world.facts_in(split)))
    gen = SKILLS[skill].generate
    while True:
        key, example = gen(rng, world, easy)
        # Easy examples feed pretraining only, but some (a one-sentence passage)
        # can also be ordinary examples, so they obey the split too.
        if bucket_split(f"{skill}|{key}") == split:
            return example


def make_split(skill: str, world: World, split: str, n: int, seed: int) -> list[Example]:
    """Up to ``n`` distinct examples (by prompt) of a skill's split."""
    rng = random.Random(f"{skill}-{split}-{seed}")
    out: dict[str, Example] = {}
    if skill in _FACT_SKILLS:
        facts = world.facts_in(split)
        rng.shuffle(facts)
        for fact in facts[:n]:
            example = _FACT_SKILLS[skill](rng, world, fact)
            out[example.prompt] = example
        return list(out.values())
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        example = sample(skill, rng, world, split)
        out.setdefault(example.prompt, example)
    return list(out.values())


# --------------------------------------------------------------------------- corpus

_COUNTRY_SENTENCES = (
    "{s} is a city in {o}.", "The city of {s} lies in {o}.", "{s} belongs to {o}.",
    "In {o} there is a city called {s}.", "{s} is one of the cities of {o}.",
    "Travellers to {o} often visit {s}.",
)
_CITY_SENTENCES = (
    "{s} lives in {o}.", "{s} has a home in {o}.", "{s} moved to {o} long ago.",
    "The house of {s} is in {o}.", "Every morning {s} walks through {o}.",
)
_PET_SENTENCES = (
    "{s} owns a {o}.", "{s} has a pet {o}.", "The pet of {s} is a {o}.",
    "{s} takes care of a {o}.", "{s} feeds a {o} every day.",
)
_FACT_SENTENCES = {"country": _COUNTRY_SENTENCES, "city": _CITY_SENTENCES, "pet": _PET_SENTENCES}


def world_document(rng: random.Random, world: World, n_sentences: int) -> str:
    """A few random facts in random paraphrases: the knowledge augmentation that
    lets a fine-tune on some facts' questions extract the other facts."""
    facts = world.facts()
    lines = []
    for _ in range(n_sentences):
        relation, subject, obj = rng.choice(facts)
        lines.append(rng.choice(_FACT_SENTENCES[relation]).format(s=subject, o=obj))
    return " ".join(lines)


def story_document(rng: random.Random, world: World) -> str:
    """Generic text: the world's people doing things with numbers, colours and letters."""
    person = rng.choice(sorted(world.person_city))
    name = rng.choice(PASSAGE_NAMES)
    templates = (
        lambda: f"{person} went to {world.person_city[person]} and saw {rng.randint(2, 30)} "
                f"{rng.choice(ITEMS)}.",
        lambda: f"{name} put the {rng.choice(OBJECTS)} in the {rng.choice(ROOMS)}.",
        lambda: f"The {rng.choice(OBJECTS)} in the {rng.choice(ROOMS)} was "
                f"{rng.choice(COLORS)}.",
        lambda: f"{name} counted " + " ".join(
            str(i) for i in range(rng.randint(1, 90), 100)[:rng.randint(3, 10)]) + ".",
        lambda: f"{name} wrote the letters " + _spaced(rng.sample(LETTERS, rng.randint(3, 8)))
                + ".",
        lambda: f"{name} had {rng.randint(1, 50)} {rng.choice(ITEMS)} and "
                f"{rng.randint(1, 50)} {rng.choice(ITEMS)}.",
        lambda: f"{person} and {name} talked about {rng.choice(world.countries)}.",
    )
    return " ".join(rng.choice(templates)() for _ in range(rng.randint(2, 5)))


@dataclass(frozen=True)
class Mixture:
    """Shares of the pretraining corpus, by document.

    ``primer`` documents are easy examples of the trained skills (the prompt
    format on simple cases); ``practice`` documents are ordinary training-split
    examples, so the base already has each skill a little and an expert sharpens
    it rather than learning it from nothing. Facts stay out of both: the base
    reads them only as statements, and answering questions about them is what
    the facts expert learns.
    """

    world: float = 0.45
    story: float = 0.25
    primer: float = 0.10
    practice: float = 0.20


PRACTICE_SKILLS = tuple(s for s in TRAINED if s != "facts")


def pretraining_documents(world: World, mixture: Mixture, seed: int):
    """An endless stream of pretraining documents (plain text, one per item)."""
    rng = random.Random(f"pretrain-{seed}")
    kinds = ("world", "story", "primer", "practice")
    weights = (mixture.world, mixture.story, mixture.primer, mixture.practice)
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "world":
            yield world_document(rng, world, rng.randint(3, 8))
        elif kind == "story":
            yield story_document(rng, world)
        else:
            skill = rng.choice(PRACTICE_SKILLS)
            example = sample(skill, rng, world, "train", easy=kind == "primer")
            yield example.prompt + example.answer
