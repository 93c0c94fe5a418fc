"""Suite-wide fixtures; the model builders live in tiny_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import make_model


@pytest.fixture(scope="session")
def model_family(tmp_path_factory):
    """``family(arch, n)``: a base and ``n`` fine-tunes of it, cached per session."""
    cache: dict[tuple, tuple[Path, list[Path]]] = {}

    def family(arch: str = "llama", n: int = 3, **kw) -> tuple[Path, list[Path]]:
        key = (arch, n, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-family")
            base = make_model(root / "base", arch, seed=0, **kw)
            variants = [make_model(root / f"ft{i}", arch, seed=i + 1, base=base, **kw) for i in range(n)]
            cache[key] = (base, variants)
        return cache[key]

    return family


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """Where the test zoo is built; ``MERGESMITH_TEST_ZOO_CACHE`` reuses one built earlier (local runs)."""
    import os

    given = os.environ.get("MERGESMITH_TEST_ZOO_CACHE")
    return Path(given) if given else tmp_path_factory.mktemp("zoo-cache")


@pytest.fixture(scope="session")
def zoo(zoo_cache):
    """The ``--size test`` zoo, built once per test session (about half a minute on two idle cores)
    and shared by the zoo and search tests."""
    from mergesmith.zoo import build_zoo

    return build_zoo("test", seed=0, cache_dir=zoo_cache, progress=False)
