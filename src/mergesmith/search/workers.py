"""Where candidates are scored: in this process, or on Ray actors that each hold the inputs once.

A ``Scorer`` merges a recipe into its resident model and evaluates it on the
fitness subsample. ``LocalPool`` runs one in-process (``--workers 1``: no Ray at
all); ``RayPool`` starts one Ray actor per worker, on a local cluster it starts
(``--workers N``) or on an existing one (``--ray-address``). Both offer
``submit`` / ``wait`` so the search loop does not know which it drives.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Optional

from mergesmith.errors import InputError
from mergesmith.extras import require_extras
from mergesmith.search.candidate import ResidentMerger
from mergesmith.search.fitness import answers_of, task_scores


class Scorer:
    """One worker's state: the input cache and resident model, and the fitness tasks."""

    def __init__(self, tasks: list, threads: Optional[int] = None, device: str = "cpu", batch_size: int = 16,
                 full_tasks: Optional[list] = None):
        self.merger = ResidentMerger(device=device, threads=threads)
        self.tasks = tasks  # the fitness subsample (the IRT anchors)
        self.full_tasks = full_tasks or tasks  # every validation item, for calibration and held-back checks
        self.batch_size = batch_size
        self.pid = os.getpid()

    def score(self, index: int, recipe: dict, full: bool = False) -> dict[str, Any]:
        """Merge and evaluate one candidate (on every validation item with ``full``); an error in
        the recipe is a result, not a crash. ``answers``: task -> [[item position, 1.0 or 0.0], ...]."""
        start = time.perf_counter()
        try:
            merge_s = self.merger.merge(recipe)
        except InputError as err:
            return {"index": index, "status": "invalid", "error": "; ".join(err.problems)[:2000],
                    "merge_s": time.perf_counter() - start, "eval_s": 0.0, "worker": self.pid, "full": full}
        tasks = self.full_tasks if full else self.tasks
        setup_before = self.merger.setup_s
        started = time.perf_counter()
        result = self.merger.evaluate(tasks, batch_size=self.batch_size)
        eval_s = time.perf_counter() - started - (self.merger.setup_s - setup_before)
        return {"index": index, "status": "ok", "scores": task_scores(result), "answers": answers_of(result),
                "merge_s": merge_s, "setup_s": self.merger.setup_s, "eval_s": eval_s,
                "items": sum(len(t.items) for t in tasks), "full": full, "worker": self.pid,
                "input_bytes": self.merger.cache.nbytes}


    def final(self, recipe: dict, groups: list[tuple[str, list]], seconds: float) -> dict[str, Any]:
        """The best recipe on whole task groups (validation, test), inside ``seconds``: merged into this
        worker's warm model from its cached inputs; the harness leaves what does not fit ``not_run``."""
        deadline = time.monotonic() + seconds
        merge_s = self.merger.merge(recipe)
        results = {label: self.merger.evaluate(tasks, deadline=deadline, batch_size=self.batch_size)
                   for label, tasks in groups if tasks}
        return {"merge_s": merge_s, "results": results}


class LocalPool:
    """``--workers 1``: candidates scored one at a time in this process."""

    def __init__(self, tasks: list, threads: Optional[int] = None, batch_size: int = 16,
                 full_tasks: Optional[list] = None):
        self.scorer = Scorer(tasks, threads, batch_size=batch_size, full_tasks=full_tasks)
        self.size = 1
        self._done: deque = deque()

    def free(self) -> int:
        return 0 if self._done else 1

    def submit(self, index: int, recipe: dict, full: bool = False) -> None:
        self._done.append(self.scorer.score(index, recipe, full))

    def in_flight(self) -> int:
        return len(self._done)

    def wait(self, timeout: Optional[float]) -> Optional[dict]:
        return self._done.popleft() if self._done else None

    def final(self, recipe: dict, groups: list[tuple[str, list]], seconds: float) -> Optional[dict]:
        return self.scorer.final(recipe, groups, seconds)

    def close(self) -> None:
        pass


class RayPool:
    """One Ray actor per worker; each reads the inputs once and keeps them for all its candidates."""

    def __init__(self, tasks: list, workers: int, *, address: Optional[str] = None, threads: Optional[int] = None,
                 batch_size: int = 16, full_tasks: Optional[list] = None):
        require_extras("mergesmith search with --workers > 1 or --ray-address", "search", ["ray"])
        import ray

        self.ray = ray
        cores = os.cpu_count() or 1
        threads = threads or max(1, cores // workers)
        self.started_cluster = address is None and not ray.is_initialized()
        if address is not None:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        elif not ray.is_initialized():
            # The actors inherit this environment (PYTHONPATH included), so they import this mergesmith.
            ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        actor = ray.remote(num_cpus=threads)(Scorer)
        self.actors = [actor.remote(tasks, threads, batch_size=batch_size, full_tasks=full_tasks)
                       for _ in range(workers)]
        self.size = workers
        self.idle = list(range(workers))
        self.running: dict[Any, int] = {}  # object ref -> actor number

    def free(self) -> int:
        return len(self.idle)

    def submit(self, index: int, recipe: dict, full: bool = False) -> None:
        k = self.idle.pop()
        self.running[self.actors[k].score.remote(index, recipe, full)] = k

    def in_flight(self) -> int:
        return len(self.running)

    def wait(self, timeout: Optional[float]) -> Optional[dict]:
        if not self.running:
            return None
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        self.idle.append(self.running.pop(ref))
        return self.ray.get(ref)

    def final(self, recipe: dict, groups: list[tuple[str, list]], seconds: float) -> Optional[dict]:
        """``Scorer.final`` on an idle actor (its model and inputs are warm); if every actor is busy, the
        first to finish is taken (its candidate's result is dropped). None if none frees up in time."""
        started = time.monotonic()
        if not self.idle and self.wait(seconds / 2) is None:
            return None
        left = seconds - (time.monotonic() - started)
        ref = self.actors[self.idle[-1]].final.remote(recipe, groups, left)
        ready, _ = self.ray.wait([ref], timeout=max(left, 0.0) + 5.0)  # the actor keeps to `left` itself
        return self.ray.get(ready[0]) if ready else None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started_cluster:
            self.ray.shutdown()


def make_pool(tasks: list, workers: int, address: Optional[str], threads: Optional[int], batch_size: int = 16,
              full_tasks: Optional[list] = None):
    if workers == 1 and address is None:
        return LocalPool(tasks, threads, batch_size, full_tasks)
    return RayPool(tasks, workers, address=address, threads=threads, batch_size=batch_size, full_tasks=full_tasks)
