"""The expert pool: every model a competitor could merge, the ones a careful user would not
merge included.

The LLM Merging Competition hands out a pool and leaves model selection to the entrant. The
zoo's pool holds the eight full experts, the LoRA experts and **distractors**: experts that
look like any other checkpoint of the family but hurt a merge.

* ``noisy:compare`` is fine-tuned exactly like the compare expert, on the same prompts, with
  every answer replaced by a wrong choice (corrupted labels). Its task vector is as large as
  a real expert's and points the other way on its skill.
* ``overtrained:wordprob`` is fine-tuned on word problems for three times the steps at ten
  times the learning rate, until it forgets much of what the base knew. Its task vector is
  several times longer than the others and dominates an unnormalized sum.

``mergesmith bench`` merges only the eight clean experts (its table stays comparable); it
evaluates the distractors as rows so that their harm is visible. ``mergesmith zoo pool``
lists the pool.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from mergesmith.zoo import skills as S


@dataclass(frozen=True)
class Distractor:
    name: str
    skill: str
    doc: str
    steps_factor: float = 1.0  # times the size's ft_steps
    lr_factor: float = 1.0  # times the size's ft_lr
    corrupt_labels: bool = False

    def settings(self) -> dict:
        return asdict(self)


DISTRACTORS: tuple[Distractor, ...] = (
    Distractor("noisy:compare", "compare", corrupt_labels=True,
               doc="fine-tuned on compare with every answer replaced by a wrong choice (corrupted labels)"),
    Distractor("overtrained:wordprob", "wordprob", steps_factor=3.0, lr_factor=10.0,
               doc="fine-tuned on wordprob for 3x the steps at 10x the learning rate; forgets the base's skills"),
)


def folder_name(d: Distractor) -> str:
    """``noisy-compare``: a name safe as a folder."""
    return d.name.replace(":", "-")


def corrupt(examples: list[S.Example], seed: int) -> list[S.Example]:
    """Each example with its answer replaced by one of its wrong choices, seeded."""
    rng = random.Random(seed)
    return [S.Example(ex.prompt, rng.choice(ex.choices[1:]), ex.choices) for ex in examples]


@dataclass(frozen=True)
class PoolMember:
    name: str  # the bench's row name: expert:<skill>, lora:<skill>, noisy:compare, ...
    kind: str  # expert, lora or distractor
    path: Path
    skills: tuple[str, ...]
    doc: str

    @property
    def clean(self) -> bool:
        """Whether a careful user would merge it."""
        return self.kind != "distractor"

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "skills": list(self.skills),
                "clean": self.clean, "doc": self.doc}


def pool_of(zoo) -> list[PoolMember]:
    """The zoo's pool: full experts, LoRA experts (PEFT adapters of the base), distractors."""
    about = {s.name: s.doc for s in S.SKILLS.values()}
    out = [PoolMember(f"expert:{s}", "expert", p, (s,), f"full fine-tune on {s}: {about[s]}")
           for s, p in zoo.experts.items()]
    out += [PoolMember(f"lora:{s}", "lora", p, (s,), f"LoRA adapter (PEFT) trained on {s}")
            for s, p in zoo.lora.items()]
    by_name = {d.name: d for d in DISTRACTORS}
    for name, path in zoo.distractors.items():
        d = by_name.get(name)
        out.append(PoolMember(name, "distractor", path, (d.skill,) if d else (), d.doc if d else ""))
    return out
