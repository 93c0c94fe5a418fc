"""Tiny experts and task files for the routing tests: two skills whose prompts use disjoint
words (t10..t29 for skill a, t40..t59 for skill b), so any sensible router separates them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from tiny_models import make_model

SKILLS = {"a": range(10, 30), "b": range(40, 60)}


def prompts(skill: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{skill}-{seed}")
    words = list(SKILLS[skill])
    return [" ".join(f"t{rng.choice(words)}" for _ in range(10)) for _ in range(n)]


def write_task(path: Path, skill: str, n: int = 6, seed: int = 0, generation: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, text in enumerate(prompts(skill, n, seed)):
        if generation:
            row = {"id": f"{skill}{k}", "type": "generation", "prompt": text, "references": ["t5"]}
        else:
            row = {"id": f"{skill}{k}", "type": "multiple_choice", "prompt": text, "choices": [" t5", " t6", " t7"],
                   "answer": k % 3}
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if generation:  # the tiny models' window is 64 tokens: leave room for the prompt
        config = path.with_suffix(".yaml")
        config.write_text(yaml.safe_dump({"task": skill, "data": path.name, "generation": {"max_new_tokens": 4}}))
        return config
    return path


def write_hidden_csv(path: Path, skill: str, n: int = 4, seed: int = 5) -> Path:
    """A competition-style test file: multiple-choice prompts and choices, no answers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["id,input,eval_type,answer_choices"]
    choices = "\"[' t5', ' t6', ' t7']\""
    rows += [f'{k},"{text}",multiple_choice,{choices}' for k, text in enumerate(prompts(skill, n, seed))]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def make_experts(root: Path) -> dict[str, Path]:
    base = make_model(root / "base", "llama", seed=0)
    return {"base": base, "a": make_model(root / "expert_a", "llama", seed=1, base=base, noise=0.5),
            "b": make_model(root / "expert_b", "llama", seed=2, base=base, noise=0.5),
            "merged": make_model(root / "merged", "llama", seed=3, base=base, noise=0.1)}


def write_recipe(path: Path, models: dict[str, Path], data: dict[str, list[Path]], kind: str = "centroid",
                 **extra) -> Path:
    recipe = {"base_model": str(models["base"]), "router": {"kind": kind},
              "experts": [{"name": s, "model": str(models[s]), "data": [str(f) for f in data[s]]} for s in ("a", "b")]}
    recipe.update(extra)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path
