"""Build (or reuse) the zoo: tokenizer, task files, base, experts, LoRA experts, multitask.

Layout under the cache folder (``--cache``, ``$MERGESMITH_CACHE/zoo`` or
``~/.cache/mergesmith/zoo``)::

    <size>-s<seed>-<key>/                 everything the world seed and size decide
        data/tokenizer/  data/world.json
        data/tasks/train/gen/<skill>.jsonl    the trained skills' training split
        base/                             pretrained LlamaForCausalLM + tokenizer
        tasks-<key>/<split>/<mc|gen>/<skill>.jsonl   validation and test tasks, every skill
        ft<finetune_seed>-<key>/          one fine-tuning run on that base
            experts/<skill>/  lora/<skill>/  multitask/
            distractors/<name>-<key>/     the pool's distractors (zoo/pool.py)
            zoo.json                      the manifest; written last

Every folder is built under a temporary name and renamed when complete, so an
interrupted build leaves no half-written entry, and the next run resumes from the
parts that are done. The keys hash every setting of the size (and a format
version), so changing a setting builds afresh instead of reusing stale models.
The evaluation tasks and the distractors have keys of their own: a new held-out
skill or a new distractor builds just that part and keeps the trained models, whose
training data it does not change (``tests/zoo/test_skills.py`` pins that data).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from mergesmith.checks import at_least, device_problems, output_dir_problems, resolve_device
from mergesmith.errors import InputError
from mergesmith.paths import OutputLock, process_alive
from mergesmith.extras import require_extras
from mergesmith.zoo import skills as S
from mergesmith.zoo.model import SIZES, ZooSize, count_parameters, get_size, make_model
from mergesmith.zoo.train import TrainLog, finetune, pretrain

# Bump when generated data or training changes in a way the settings do not show.
ZOO_FORMAT = 3
# Bump when the evaluation tasks change (their skills are hashed into the key as well).
TASKS_FORMAT = 4
FORMS = ("mc", "gen")
TOKENIZER_DOCS = 5000


@dataclass
class Zoo:
    """Paths to a built zoo. Task files: ``tasks[split][form][skill]``."""

    root: Path  # the fine-tuning run's folder (holds zoo.json)
    size: str
    seed: int
    finetune_seed: int
    base: Path
    experts: dict[str, Path]
    lora: dict[str, Path]
    multitask: Path
    trained: tuple[str, ...]
    heldout: tuple[str, ...]
    tasks: dict[str, dict[str, dict[str, Path]]]
    distractors: dict[str, Path] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def pool(self) -> list:
        """Every model a competitor could merge, with a short description (``zoo/pool.py``)."""
        from mergesmith.zoo.pool import pool_of

        return pool_of(self)

    @property
    def skills(self) -> tuple[str, ...]:
        return self.trained + self.heldout

    @property
    def tokenizer(self) -> Path:
        return self.base

    def task_files(self, split: str = "test", form: str = "mc",
                   skills: Optional[list[str]] = None) -> list[Path]:
        """Task files of one split and form, in skill order (trained, then held-out)."""
        files = self.tasks[split][form]
        return [files[s] for s in (skills or self.skills) if s in files]

    def models(self) -> dict[str, Path]:
        """The full checkpoints by table row name: base, expert:<skill>, multitask."""
        out = {"base": self.base}
        out.update({f"expert:{s}": p for s, p in self.experts.items()})
        out["multitask"] = self.multitask
        return out

    @classmethod
    def load(cls, root: Path) -> "Zoo":
        root = Path(root)
        manifest = json.loads((root / "zoo.json").read_text())
        base_root = root.parent

        def abs_map(d: dict) -> dict:
            return {k: (base_root / v if isinstance(v, str) else abs_map(v)) for k, v in d.items()}

        return cls(root=root, size=manifest["size"], seed=manifest["seed"],
                   finetune_seed=manifest["finetune_seed"], base=base_root / manifest["base"],
                   experts=abs_map(manifest["experts"]), lora=abs_map(manifest["lora"]),
                   multitask=base_root / manifest["multitask"],
                   trained=tuple(manifest["skills"]["trained"]),
                   heldout=tuple(manifest["skills"]["heldout"]),
                   tasks=abs_map(manifest["tasks"]),
                   distractors=abs_map(manifest.get("distractors", {})), manifest=manifest)


# ----------------------------------------------------------------------------- cache


def default_cache() -> Path:
    env = os.environ.get("MERGESMITH_CACHE")
    return (Path(env) / "zoo") if env else Path.home() / ".cache" / "mergesmith" / "zoo"


def _key(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def base_settings(size: ZooSize, seed: int) -> dict:
    """What the base folder depends on: the world, data and pretraining settings."""
    fine = ("train_examples", "ft_steps", "ft_batch", "ft_lr", "multitask_steps", "lora_skills",
            "lora_rank", "lora_steps", "lora_lr")
    return {"format": ZOO_FORMAT, "seed": seed,
            **{k: v for k, v in size.settings().items() if k not in fine}}


def finetune_settings(size: ZooSize, finetune_seed: int) -> dict:
    return {"format": ZOO_FORMAT, "finetune_seed": finetune_seed, **size.settings()}


def tasks_settings(size: ZooSize, seed: int) -> dict:
    """What the validation and test files depend on: the world, the counts, the skills."""
    return {"format": TASKS_FORMAT, "seed": seed, "skills": list(S.SKILLS),
            **{k: getattr(size, k) for k in ("n_countries", "n_cities", "n_people", "n_validation", "n_test")}}


def distractor_folder(root: Path, size: ZooSize, d) -> Path:
    from mergesmith.zoo.pool import folder_name

    return root / "distractors" / f"{folder_name(d)}-{_key({'format': ZOO_FORMAT, **d.settings()})}"


def layout_key(size: ZooSize, seed: int) -> str:
    """What a finished manifest must have been written for: this tasks folder, these distractors.
    A manifest with another key is completed by building the missing parts."""
    from mergesmith.zoo.pool import DISTRACTORS

    return _key({"tasks": tasks_settings(size, seed), "distractors": [d.settings() for d in DISTRACTORS]})



def remove_stale_temps(target: Path) -> None:
    """Delete temporary folders of ``target`` left by killed builds (their pid is gone)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block succeeds.

    An exception (Ctrl-C included) removes the folder; a hard kill leaves it under
    its temporary name, never under ``target``, and the next build removes it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():  # another process finished it first; theirs is as good
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _seed_for(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------- stages


def _world(size: ZooSize, seed: int) -> S.World:
    return S.make_world(seed, size.n_countries, size.n_cities, size.n_people)


def _task_rows(skill: str, examples: list[S.Example], split: str, form: str, seed: int) -> list[dict]:
    rng = random.Random(f"choices-{skill}-{split}-{seed}")
    rows = []
    for i, ex in enumerate(examples):
        row = {"id": f"{skill}-{split}-{i:04d}", "prompt": ex.prompt}
        if form == "mc":
            choices, answer = ex.shuffled_choices(rng)
            row.update(type="multiple_choice", choices=choices, answer=answer)
        else:
            row.update(type="generation", references=[ex.answer.strip()])
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_data(folder: Path, size: ZooSize, seed: int) -> None:
    """Tokenizer, the world as JSON, and the trained skills' training split."""
    world = _world(size, seed)
    docs = S.pretraining_documents(world, size.mixture, seed)
    from mergesmith.zoo.tokenizer import train_tokenizer  # needs the zoo extra (tokenizers)

    tokenizer = train_tokenizer(itertools.islice(docs, TOKENIZER_DOCS), size.vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    _write_json(folder / "world.json", {
        "countries": list(world.countries), "city_country": world.city_country,
        "person_city": world.person_city, "person_pet": world.person_pet})
    for skill in S.TRAINED:  # the training split, as the experts see it (first fine-tune seed)
        examples = S.make_split(skill, world, "train", size.train_examples, seed)
        _write_jsonl(folder / "tasks" / "train" / "gen" / f"{skill}.jsonl",
                     _task_rows(skill, examples, "train", "gen", seed))


def build_tasks(folder: Path, size: ZooSize, seed: int) -> None:
    """Every skill's validation and test files, multiple-choice and generation form."""
    world = _world(size, seed)
    counts = {"validation": size.n_validation, "test": size.n_test}
    for skill in S.SKILLS:
        for split, n in counts.items():
            examples = S.make_split(skill, world, split, n, seed)
            for form in FORMS:
                rows = _task_rows(skill, examples, split, form, seed)
                _write_jsonl(folder / split / form / f"{skill}.jsonl", rows)


def _corpus(tokenizer, size: ZooSize, world: S.World, seed: int) -> torch.Tensor:
    """Enough packed pretraining tokens that each is seen about once."""
    need = size.pretrain_steps * size.pretrain_batch * size.block + size.block + 1
    docs = S.pretraining_documents(world, size.mixture, seed + 1)  # not the tokenizer's docs
    ids: list[int] = []
    while len(ids) < need:
        batch = list(itertools.islice(docs, 2000))
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids[:need], dtype=torch.long)


def environment() -> dict:
    """What decides whether a rebuild is bit-identical (docs/zoo.md, Determinism)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu}


def _save(model, tokenizer, folder: Path, log: TrainLog, extra: dict) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_json(folder / "zoo_train.json", {**extra, **log.as_dict(), "built_with": environment()})


def build_base(folder: Path, data: Path, size: ZooSize, seed: int, progress: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    tokens = _corpus(tokenizer, size, _world(size, seed), seed)
    torch.manual_seed(_seed_for(seed, "base-init"))
    model = make_model(size, tokenizer)
    log = pretrain(model, tokens, steps=size.pretrain_steps, batch=size.pretrain_batch,
                   block=size.block, lr=size.pretrain_lr, seed=_seed_for(seed, "base-data"),
                   device=size.device, progress=progress)
    _save(model.to("cpu"), tokenizer, folder, log,
          {"role": "base", "parameters": count_parameters(model), "corpus_tokens": len(tokens)})


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesmith.evaluate.model import quiet_loading

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def _train_examples(size: ZooSize, world: S.World, skills: tuple[str, ...],
                    finetune_seed: int) -> list[S.Example]:
    out = []
    for skill in skills:
        out += S.make_split(skill, world, "train", size.train_examples, finetune_seed)
    return out


def build_finetune(folder: Path, base: Path, size: ZooSize, seed: int, finetune_seed: int,
                   skills: tuple[str, ...], steps: int, role: str, progress: bool) -> None:
    """A full fine-tune of the base on ``skills`` (one skill: an expert; all: multitask)."""
    model, tokenizer = _load(base)
    examples = _train_examples(size, _world(size, seed), skills, finetune_seed)
    torch.manual_seed(_seed_for(finetune_seed, role))
    log = finetune(model, tokenizer, examples, steps=steps, batch=size.ft_batch, lr=size.ft_lr,
                   seed=_seed_for(finetune_seed, role, "data"), desc=role, device=size.device,
                   progress=progress)
    _save(model.to("cpu"), tokenizer, folder, log,
          {"role": role, "skills": list(skills), "finetune_seed": finetune_seed})


def build_distractor(folder: Path, base: Path, size: ZooSize, seed: int, finetune_seed: int, d,
                     progress: bool) -> None:
    """A distractor of the pool (``zoo/pool.py``): an expert's fine-tune gone wrong on purpose."""
    from mergesmith.zoo.pool import corrupt

    model, tokenizer = _load(base)
    examples = _train_examples(size, _world(size, seed), (d.skill,), finetune_seed)
    if d.corrupt_labels:
        examples = corrupt(examples, _seed_for(finetune_seed, d.name, "labels"))
    torch.manual_seed(_seed_for(finetune_seed, d.name))
    log = finetune(model, tokenizer, examples, steps=max(1, round(size.ft_steps * d.steps_factor)),
                   batch=size.ft_batch, lr=size.ft_lr * d.lr_factor,
                   seed=_seed_for(finetune_seed, d.name, "data"), desc=d.name, device=size.device,
                   progress=progress)
    _save(model.to("cpu"), tokenizer, folder, log,
          {"role": d.name, "skills": [d.skill], "finetune_seed": finetune_seed, "distractor": d.settings()})


def build_lora(folder: Path, base: Path, size: ZooSize, seed: int, finetune_seed: int,
               skill: str, progress: bool) -> None:
    from mergesmith.zoo.lora import train_lora

    model, tokenizer = _load(base)
    examples = _train_examples(size, _world(size, seed), (skill,), finetune_seed)
    role = f"lora:{skill}"
    torch.manual_seed(_seed_for(finetune_seed, role))
    peft_model, log = train_lora(model, tokenizer, examples, size, seed=_seed_for(finetune_seed, role),
                                 progress=progress)
    peft_model.to("cpu").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_json(folder / "zoo_train.json",
                {"role": role, "skills": [skill], "finetune_seed": finetune_seed, **log.as_dict(),
                 "built_with": environment()})


def build_lora_pool(zoo: Zoo, device: Optional[str] = None, progress: bool = True) -> dict[str, Path]:
    """One LoRA adapter per trained skill of ``zoo`` (``<ft>/lora/<skill>``), building those missing.

    Not part of ``build_zoo``: six more adapters would add about a minute to the default build on
    two idle cores (10-14 s each), which only the LoRA rows of the benchmark need. Each is trained
    exactly as ``build_zoo`` trains the manifest's LoRA experts (same seeds, same settings, which
    the fine-tuning folder's key already hashes), so the two it lists are reused as they are.
    """
    spec = get_size(zoo.size, resolve_device(device))
    pool = {skill: zoo.root / "lora" / skill for skill in zoo.trained}
    missing = [skill for skill, path in pool.items() if not path.exists()]
    if not missing:
        return pool
    require_extras("mergesmith bench --lora", "zoo")
    timings: dict[str, float] = {}
    with OutputLock(zoo.base.parent, wait=True):  # as build_zoo: builds of this world take turns
        for skill in missing:
            _stage(pool[skill], f"lora:{skill}",
                   lambda t, s=skill: build_lora(t, zoo.base, spec, zoo.seed, zoo.finetune_seed, s, progress),
                   timings, progress)
    return pool


# ----------------------------------------------------------------------------- driver


def _stage(target: Path, label: str, build, timings: dict, progress: bool) -> None:
    """Build ``target`` atomically unless it is already there."""
    if target.exists():
        return
    start = time.time()
    if progress:
        print(f"zoo: building {label}", flush=True)
    with atomic_dir(target) as tmp:
        build(tmp)
    timings[label] = round(time.time() - start, 1)


def zoo_root(size: str = "default", seed: int = 0, cache_dir: Optional[Path] = None,
             finetune_seed: Optional[int] = None) -> Path:
    """Where ``build_zoo`` with these arguments puts its manifest (built or not)."""
    spec = get_size(size)
    ft_seed = seed if finetune_seed is None else finetune_seed
    cache = Path(cache_dir) if cache_dir else default_cache()
    base_root = cache / f"{spec.name}-s{seed}-{_key(base_settings(spec, seed))}"
    return base_root / f"ft{ft_seed}-{_key(finetune_settings(spec, ft_seed))}"


def build_problems(size: str = "default", seed: int = 0, cache_dir: Optional[Path] = None, *,
                   finetune_seed: Optional[int] = None, device: Optional[str] = None) -> list[str]:
    """Every problem with these zoo arguments, found without building or importing anything heavy."""
    problems = [] if size in SIZES else [f"--size {size!r}: not a zoo size; use one of {', '.join(SIZES)}"]
    problems += at_least("--seed", seed, 0, "the world and base seed")
    problems += at_least("--finetune-seed", finetune_seed, 0, "the fine-tuning seed", optional=True)
    problems += device_problems(device)
    cache = Path(cache_dir) if cache_dir else default_cache()
    problems += output_dir_problems(cache, flag="--cache")
    return problems


def build_zoo(size: str = "default", seed: int = 0, cache_dir: Optional[Path] = None, *,
              finetune_seed: Optional[int] = None, device: Optional[str] = None,
              progress: bool = True, rebuild: bool = False) -> Zoo:
    """Build the zoo for ``size`` and ``seed``, or reuse the cached one.

    ``finetune_seed`` (default: ``seed``) varies only the fine-tuning (data order,
    sampled training examples, initialisation of LoRA): several fine-tune seeds
    share one world, one base and one set of task files, which is how the
    benchmark measures the spread of merge results cheaply.

    Every argument, the cache folder and the optional packages are checked first
    (``build_problems``), before minutes of training.
    """
    problems = build_problems(size, seed, cache_dir, finetune_seed=finetune_seed, device=device)
    if problems:
        raise InputError(problems)
    spec = get_size(size, resolve_device(device))
    ft_seed = seed if finetune_seed is None else finetune_seed
    root = zoo_root(size, seed, cache_dir, ft_seed)
    base_root = root.parent
    if not rebuild and _finished(root, spec, seed):
        return Zoo.load(root)  # a cached zoo needs none of the training packages
    require_extras("mergesmith zoo build", "zoo")
    # Builds sharing this world (and base) take turns: a second one waits, then reuses what
    # the first one built, instead of training it again (or deleting it under --rebuild).
    with OutputLock(base_root, wait=True):
        if not rebuild and _finished(root, spec, seed):
            return Zoo.load(root)
        return _build_locked(spec, size, seed, ft_seed, root, base_root, rebuild, progress)


def _finished(root: Path, spec: ZooSize, seed: int) -> bool:
    """A manifest is there and lists what this version of the zoo has (tasks, distractors)."""
    path = root / "zoo.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("layout") == layout_key(spec, seed)
    except (OSError, ValueError):
        return False


def _build_locked(spec: ZooSize, size: str, seed: int, ft_seed: int, root: Path, base_root: Path,
                  rebuild: bool, progress: bool) -> Zoo:
    if rebuild and base_root.exists():
        shutil.rmtree(base_root)
    timings: dict[str, float] = {}
    started = time.time()
    data = base_root / "data"
    _stage(data, "data", lambda t: build_data(t, spec, seed), timings, progress)
    base = base_root / "base"
    _stage(base, "base", lambda t: build_base(t, data, spec, seed, progress), timings, progress)
    tasks = base_root / f"tasks-{_key(tasks_settings(spec, seed))}"
    _stage(tasks, "tasks", lambda t: build_tasks(t, spec, seed), timings, progress)
    root.mkdir(parents=True, exist_ok=True)
    for skill in S.TRAINED:
        _stage(root / "experts" / skill, f"expert:{skill}",
               lambda t, s=skill: build_finetune(t, base, spec, seed, ft_seed, (s,), spec.ft_steps,
                                                 f"expert:{s}", progress), timings, progress)
    for skill in spec.lora_skills:
        _stage(root / "lora" / skill, f"lora:{skill}",
               lambda t, s=skill: build_lora(t, base, spec, seed, ft_seed, s, progress),
               timings, progress)
    _stage(root / "multitask", "multitask",
           lambda t: build_finetune(t, base, spec, seed, ft_seed, S.TRAINED, spec.multitask_steps,
                                    "multitask", progress), timings, progress)
    from mergesmith.zoo.pool import DISTRACTORS

    for d in DISTRACTORS:
        _stage(distractor_folder(root, spec, d), d.name,
               lambda t, d=d: build_distractor(t, base, spec, seed, ft_seed, d, progress), timings, progress)
    try:  # a completed build keeps the times of the stages an earlier run built
        earlier = json.loads((root / "zoo.json").read_text())["build_seconds"]
        timings = {**{k: v for k, v in earlier.items() if k != "this_run"}, **timings}
    except (OSError, ValueError, KeyError):
        pass
    manifest = _manifest(spec, seed, ft_seed, root, timings, time.time() - started)
    _write_json(root / "zoo.json", manifest)
    return Zoo.load(root)


def _manifest(spec: ZooSize, seed: int, ft_seed: int, root: Path, timings: dict,
              seconds: float) -> dict:
    from mergesmith.zoo.pool import DISTRACTORS

    ft = root.name
    folder = f"tasks-{_key(tasks_settings(spec, seed))}"
    tasks = {split: {form: {s: f"{folder}/{split}/{form}/{s}.jsonl" for s in S.SKILLS}
                     for form in FORMS} for split in ("validation", "test")}
    tasks["train"] = {"gen": {s: f"data/tasks/train/gen/{s}.jsonl" for s in S.TRAINED}}
    logs = {}
    for path in [root.parent / "base", *sorted(root.glob("*/*")), root / "multitask"]:
        log = path / "zoo_train.json"
        if log.exists():
            logs[path.relative_to(root.parent).as_posix()] = json.loads(log.read_text())
    return {
        "format": ZOO_FORMAT,
        "layout": layout_key(spec, seed),
        "size": spec.name,
        "seed": seed,
        "finetune_seed": ft_seed,
        "settings": spec.settings(),
        "device": spec.device,
        "skills": {"trained": list(S.TRAINED), "heldout": list(S.HELDOUT),
                   "about": {s.name: s.doc for s in S.SKILLS.values()}},
        "base": "base",
        "experts": {s: f"{ft}/experts/{s}" for s in S.TRAINED},
        "lora": {s: f"{ft}/lora/{s}" for s in spec.lora_skills},
        "multitask": f"{ft}/multitask",
        "distractors": {d.name: distractor_folder(root, spec, d).relative_to(root.parent).as_posix()
                        for d in DISTRACTORS},
        "tasks": tasks,
        "training": logs,
        "build_seconds": {"this_run": round(seconds, 1), **timings},
    }
