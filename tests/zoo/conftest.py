"""The zoo tests use the session-wide ``zoo`` and ``zoo_cache`` fixtures of tests/conftest.py."""
