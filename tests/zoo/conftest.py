"""The zoo tests use the session-wide ``zoo`` and ``zoo_cache`` fixtures of tests/conftest.py."""

from __future__ import annotations

import pytest

from mergesmith.zoo import bench as BN
from mergesmith.zoo import bench_learned as BL


@pytest.fixture
def stub_learners(tmp_path, monkeypatch):
    """``learn_row`` with AdaMerging and DAM replaced by stubs that record what they were given.

    Returns ``(seen, learn)``: ``seen[method]`` lists the ``(data, knobs)`` of every call that
    reached the learner (a cached entry does not), ``learn(zoo, method, **kw)`` runs ``learn_row``
    for seed 0 with a fresh evaluation cache under ``tmp_path``.
    """
    seen: dict[str, list] = {}

    def stub(name):
        def fake(zoo, seed, data, knobs, folder, device, progress):
            seen.setdefault(name, []).append((data, knobs))
            return {"recipe": {}, "steps": 1, "objective_before": 1.0, "objective_after": 0.5}
        return fake

    monkeypatch.setattr(BL, "_adamerging", stub("adamerging"))
    monkeypatch.setattr(BL, "_dam", stub("dam"))
    cache = BN.EvalCache(tmp_path / "evals")

    def learn(zoo, method, **kw):
        return BL.learn_row(zoo, method, 0, cache=cache, work=tmp_path, device="cpu", val_limit=None,
                            progress=False, log=lambda m: None, **kw)

    return seen, learn
