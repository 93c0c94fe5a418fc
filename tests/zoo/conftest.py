"""The ``--size test`` zoo, built once per test session (about half a minute on two cores)."""

import pytest


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-cache")


@pytest.fixture(scope="session")
def zoo(zoo_cache):
    from mergesmith.zoo import build_zoo

    return build_zoo("test", seed=0, cache_dir=zoo_cache, progress=False)
