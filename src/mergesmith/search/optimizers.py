"""Optimizers over the unit cube, behind one ask/tell interface.

``ask()`` returns a batch (a generation) of unit vectors; ``tell(us, objectives)``
gives back one objective vector per candidate, higher is better. A batch cut short by
the budget is never told (CMA-ES needs whole generations), and its scored candidates
stay in the trace only.

- ``cma``: CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", 2016) through the
  ``cma`` package, bounded to [0, 1]; the default, as in Akiba et al., "Evolutionary
  Optimization of Model Merging Recipes" (2024) and mergekit-evolve.
- ``random``: uniform random search, the baseline every other must beat.
- ``nsga2``: NSGA-II (Deb et al., 2002) through optuna, multi-objective over the
  per-task accuracies; its result is a Pareto front rather than one best recipe.

``save_optimizer``/``load_optimizer`` keep what ``--resume`` needs as JSON in a format of
ours (``state()``, ``from_state``), never a pickle of library objects: their layout is
the library's and changes between versions (cma's docstring resumes from a pickle but
promises nothing across versions, and cma defines no ``__setstate__`` that would upgrade
an old one; optuna 5.1's sampler holds a lock and no longer pickles at all).

- ``random``: its settings and its numpy generator's state.
- ``cma``, ``nsga2``: their settings and every told generation (the candidates and their
  objectives). Loading builds the optimizer afresh with the same seed and replays ask and
  tell generation by generation, which rebuilds the library's state exactly, so the
  resumed run asks what the uninterrupted one would have. If a replayed ask differs from
  the stored candidates (another library version samples differently), the stored
  generations are told all the same, so the population and its fitness are kept, and a
  warning says that the continuation is no longer the uninterrupted run's sequence.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mergesmith.errors import InputError

OPTIMIZERS = ("cma", "random", "nsga2")
STATE_FORMAT = "mergesmith search state"
STATE_VERSION = 1


class RandomSearch:
    name = "random"
    multi_objective = False

    def __init__(self, dim: int, seed: int = 0, batch: int = 4):
        self.dim, self.batch = dim, batch
        self.rng = np.random.default_rng(seed)
        self.generation = 0

    def ask(self) -> list[np.ndarray]:
        return [self.rng.random(self.dim) for _ in range(self.batch)]

    def tell(self, us: list[np.ndarray], objectives: list[list[float]]) -> None:
        self.generation += 1

    def state(self) -> dict[str, Any]:
        # The generator's state is a dict of ints (PCG64's are 128-bit; JSON keeps them whole).
        return {"optimizer": self.name, "dim": self.dim, "batch": self.batch, "generation": self.generation,
                "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RandomSearch":
        optimizer = cls(state["dim"], 0, state["batch"])
        bit_generator = getattr(np.random, state["rng"]["bit_generator"])()
        bit_generator.state = state["rng"]
        optimizer.rng = np.random.Generator(bit_generator)
        optimizer.generation = state["generation"]
        return optimizer


class CMAES:
    name = "cma"
    multi_objective = False

    def __init__(self, dim: int, seed: int = 0, batch: Optional[int] = None, x0: Optional[np.ndarray] = None,
                 sigma0: float = 0.25):
        import cma

        # A generator of our own instead of cma's default, numpy's global one (which cma would reseed):
        # nothing else in the process can shift the sequence, and its state is ours to save. The same
        # seed gives the same draws as np.random.seed(seed + 1) did.
        self.rng = np.random.RandomState(seed + 1)
        options: dict[str, Any] = {"bounds": [0.0, 1.0], "seed": np.nan, "randn": self.rng.randn, "verbose": -9}
        if batch:
            options["popsize"] = batch
        start = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=float)
        # cma refuses one dimension; a second, ignored coordinate keeps the code path the same.
        self.padded = dim == 1
        if self.padded:
            start = np.append(start, 0.5)
        self.es = cma.CMAEvolutionStrategy(start, sigma0, options)
        self.settings = {"dim": dim, "seed": seed, "batch": batch,
                         "x0": None if x0 is None else [float(v) for v in x0], "sigma0": sigma0}
        self.dim = dim
        self.generation = 0
        self.told: list[dict[str, list]] = []  # every told generation, for the replay on load
        self.told_foreign = False  # whether a replay told candidates cma did not ask for
        self._pending: Optional[list[np.ndarray]] = None

    @property
    def batch(self) -> int:
        return int(self.es.popsize)

    def ask(self) -> list[np.ndarray]:
        self._pending = [np.asarray(x) for x in self.es.ask()]
        return [np.clip(x[: self.dim], 0.0, 1.0) for x in self._pending]

    def tell(self, us: list[np.ndarray], objectives: list[list[float]]) -> None:
        import cma

        assert self._pending is not None and len(us) == len(self._pending)
        with warnings.catch_warnings():
            if self.told_foreign:
                # cma warns of the mirrored samples it asked for and never got back: expected once a
                # replay told the stored candidates instead, and from_state already warned.
                warnings.simplefilter("ignore", cma.evolution_strategy.InjectionWarning)
            self.es.tell(self._pending, [-float(o[0]) for o in objectives])  # cma minimizes
        self.told.append({"candidates": [x.tolist() for x in self._pending],
                          "objectives": [[float(v) for v in o] for o in objectives]})
        self._pending = None
        self.generation += 1

    def state(self) -> dict[str, Any]:
        import cma

        rng = self.rng.get_state(legacy=False)
        rng["state"]["key"] = rng["state"]["key"].tolist()
        return {"optimizer": self.name, **self.settings, "cma_version": cma.__version__,
                "generation": self.generation, "told": self.told, "rng": rng}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CMAES":
        optimizer = cls(state["dim"], state["seed"], state["batch"], state["x0"], state["sigma0"])
        diverged = None
        for generation, told in enumerate(state["told"]):
            us = optimizer.ask()
            stored = [np.asarray(x, dtype=float) for x in told["candidates"]]
            if not _same_vectors(optimizer._pending, stored):
                diverged = generation if diverged is None else diverged
                optimizer._pending = stored  # cma takes told solutions it did not ask for
                optimizer.told_foreign = True
                us = [np.clip(x[: optimizer.dim], 0.0, 1.0) for x in stored]
            optimizer.tell(us, told["objectives"])
        # Where the replay matched this is the state it reached already; after a divergence it is
        # at least the saved run's generator, not the replay's.
        optimizer.rng.set_state(state["rng"])
        if diverged is not None:
            import cma

            _warn_diverged("cma", f"cma {state.get('cma_version')}", f"cma {cma.__version__}", diverged)
        return optimizer


class NSGA2:
    name = "nsga2"
    multi_objective = True

    def __init__(self, dim: int, n_objectives: int, seed: int = 0, batch: int = 8):
        self.dim, self.batch, self.n_objectives, self.seed = dim, batch, n_objectives, seed
        self.study = self._new_study()
        self.generation = 0
        self.told: list[dict[str, list]] = []  # every told generation, for the replay on load
        self._pending: list[Any] = []

    def _new_study(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=self.batch, seed=self.seed)
        return optuna.create_study(directions=["maximize"] * self.n_objectives, sampler=sampler)

    def ask(self) -> list[np.ndarray]:
        self._pending = [self.study.ask() for _ in range(self.batch)]
        return [np.array([t.suggest_float(f"u{i}", 0.0, 1.0) for i in range(self.dim)]) for t in self._pending]

    def tell(self, us: list[np.ndarray], objectives: list[list[float]]) -> None:
        for trial, values in zip(self._pending, objectives):
            self.study.tell(trial, [float(v) for v in values])
        self.told.append({"params": [[float(x) for x in u] for u in us],
                          "values": [[float(v) for v in values] for values in objectives]})
        self._pending = []
        self.generation += 1

    def state(self) -> dict[str, Any]:
        import optuna

        return {"optimizer": self.name, "dim": self.dim, "n_objectives": self.n_objectives, "seed": self.seed,
                "batch": self.batch, "optuna_version": optuna.__version__, "generation": self.generation,
                "told": self.told}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "NSGA2":
        import optuna

        optimizer = cls(state["dim"], state["n_objectives"], state["seed"], state["batch"])
        for generation, told in enumerate(state["told"]):
            us = optimizer.ask()
            if not _same_vectors(us, [np.asarray(p, dtype=float) for p in told["params"]]):
                # The asked trials carry the wrong parameters: start over with the stored trials alone.
                optimizer = cls(state["dim"], state["n_objectives"], state["seed"], state["batch"])
                optimizer._add_trials(state["told"])
                _warn_diverged("nsga2", f"optuna {state.get('optuna_version')}", f"optuna {optuna.__version__}",
                               generation)
                return optimizer
            optimizer.tell(us, told["values"])
        return optimizer

    def _add_trials(self, told: list[dict[str, list]]) -> None:
        """The stored generations as finished trials, each generation numbered as NSGA-II numbers it, so
        that the sampler takes them for its population (trials added complete carry no generation, and
        NSGA-II would start again from a random one)."""
        import optuna

        distributions = {f"u{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(self.dim)}
        for generation in told:
            numbers = []
            for params in generation["params"]:
                self.study.add_trial(optuna.trial.create_trial(
                    state=optuna.trial.TrialState.RUNNING, distributions=distributions,
                    params={f"u{i}": float(x) for i, x in enumerate(params)}))
                trial = self.study.get_trials(deepcopy=False)[-1]
                self.study.sampler.get_trial_generation(self.study, trial)
                numbers.append(trial.number)
            for number, values in zip(numbers, generation["values"]):
                self.study.tell(number, [float(v) for v in values])
            self.told.append(generation)
            self.generation += 1


def _same_vectors(asked: list[np.ndarray], stored: list[np.ndarray]) -> bool:
    return len(asked) == len(stored) and all(np.array_equal(a, b) for a, b in zip(asked, stored))


def _warn_diverged(name: str, saved_with: str, running: str, generation: int) -> None:
    warnings.warn(f"{name}: the resumed optimizer, replayed with {running} (saved with {saved_with}), proposes "
                  f"other candidates than the saved run from generation {generation} on; the stored generations "
                  "are kept with their fitness and told as they were, but the continuation will not be the "
                  "sequence an uninterrupted run would have asked", RuntimeWarning, stacklevel=3)


def make_optimizer(name: str, dim: int, *, seed: int = 0, batch: Optional[int] = None, n_objectives: int = 1,
                   random_init: bool = False) -> Any:
    if name == "cma":
        x0 = np.random.default_rng(seed).random(dim) if random_init else None
        return CMAES(dim, seed, batch, x0)
    if name == "random":
        return RandomSearch(dim, seed, batch or 4)
    if name == "nsga2":
        return NSGA2(dim, n_objectives, seed, batch or 8)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def default_batch(name: str, dim: int, workers: int) -> int:
    """A generation: CMA-ES's own population (4 + 3 ln d), else 8; at least one candidate per worker."""
    own = 4 + int(3 * math.log(max(dim, 1))) if name == "cma" else 8
    return max(own, workers)


def save_optimizer(optimizer: Any, path: Path) -> None:
    write_state(path, optimizer.state())


def load_optimizer(path: Path) -> Any:
    state = read_state(path)
    kinds = {"random": RandomSearch, "cma": CMAES, "nsga2": NSGA2}
    if state.get("optimizer") not in kinds:
        raise InputError(f"{path}: optimizer {state.get('optimizer')!r} is none of {', '.join(OPTIMIZERS)}; "
                         "start a new --out")
    return kinds[state["optimizer"]].from_state(state)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """``state`` as JSON, marked with our format and its version; atomic, so that an interrupted save
    leaves the previous state. Floats keep every bit (Python writes their shortest exact repr)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, **state}) + "\n")
    tmp.replace(path)


def read_state(path: Path) -> dict[str, Any]:
    """What ``write_state`` wrote, or an InputError naming the file and the fix."""
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable search state ({err}); start a new --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else None
        raise InputError(f"{path}: not a search state of format version {STATE_VERSION} (found {found!r}); "
                         "start a new --out")
    return state
