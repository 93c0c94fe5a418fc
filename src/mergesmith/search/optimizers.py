"""Optimizers over the unit cube, behind one ask/tell interface.

``ask()`` returns a batch (a generation) of unit vectors; ``tell(us, objectives)``
gives back one objective vector per candidate, higher is better. ``save``/``load``
pickle the whole optimizer, so that ``--resume`` continues where it stopped; a batch
cut short by the budget is never told (CMA-ES needs whole generations), and its
scored candidates stay in the trace only.

- ``cma``: CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", 2016) through the
  ``cma`` package, bounded to [0, 1]; the default, as in Akiba et al., "Evolutionary
  Optimization of Model Merging Recipes" (2024) and mergekit-evolve.
- ``random``: uniform random search, the baseline every other must beat.
- ``nsga2``: NSGA-II (Deb et al., 2002) through optuna, multi-objective over the
  per-task accuracies; its result is a Pareto front rather than one best recipe.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np

OPTIMIZERS = ("cma", "random", "nsga2")


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


class CMAES:
    name = "cma"
    multi_objective = False

    def __init__(self, dim: int, seed: int = 0, batch: Optional[int] = None, x0: Optional[np.ndarray] = None,
                 sigma0: float = 0.25):
        import cma

        options: dict[str, Any] = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}
        if batch:
            options["popsize"] = batch
        start = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=float)
        # cma refuses one dimension; a second, ignored coordinate keeps the code path the same.
        self.padded = dim == 1
        if self.padded:
            start = np.append(start, 0.5)
        self.es = cma.CMAEvolutionStrategy(start, sigma0, options)
        self.dim = dim
        self.generation = 0
        self._pending: Optional[list[np.ndarray]] = None

    @property
    def batch(self) -> int:
        return int(self.es.popsize)

    def ask(self) -> list[np.ndarray]:
        self._pending = [np.asarray(x) for x in self.es.ask()]
        return [np.clip(x[: self.dim], 0.0, 1.0) for x in self._pending]

    def tell(self, us: list[np.ndarray], objectives: list[list[float]]) -> None:
        assert self._pending is not None and len(us) == len(self._pending)
        self.es.tell(self._pending, [-float(o[0]) for o in objectives])  # cma minimizes
        self._pending = None
        self.generation += 1

    def __getstate__(self) -> dict:
        # cma draws from numpy's global generator: keep its state, so that a resumed run asks
        # what the uninterrupted one would have asked.
        state = dict(self.__dict__)
        state["_numpy_random"] = np.random.get_state()
        return state

    def __setstate__(self, state: dict) -> None:
        np.random.set_state(state.pop("_numpy_random"))
        self.__dict__.update(state)


class NSGA2:
    name = "nsga2"
    multi_objective = True

    def __init__(self, dim: int, n_objectives: int, seed: int = 0, batch: int = 8):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=batch, seed=seed)
        self.study = optuna.create_study(directions=["maximize"] * n_objectives, sampler=sampler)
        self.dim, self.batch, self.n_objectives = dim, batch, n_objectives
        self.generation = 0
        self._pending: list[Any] = []

    def ask(self) -> list[np.ndarray]:
        self._pending = [self.study.ask() for _ in range(self.batch)]
        return [np.array([t.suggest_float(f"u{i}", 0.0, 1.0) for i in range(self.dim)]) for t in self._pending]

    def tell(self, us: list[np.ndarray], objectives: list[list[float]]) -> None:
        for trial, values in zip(self._pending, objectives):
            self.study.tell(trial, [float(v) for v in values])
        self._pending = []
        self.generation += 1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pending"] = []  # asked, untold trials are not carried over a resume
        return state


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
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(optimizer))
    tmp.replace(path)  # atomic: an interrupted save leaves the previous state


def load_optimizer(path: Path) -> Any:
    return pickle.loads(path.read_bytes())
