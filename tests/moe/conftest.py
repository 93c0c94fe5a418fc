"""The MoE tests' fixture; the helpers it uses live in moe_helpers.py (a unique module name: the
suite's conftest.py files would shadow each other on import)."""

from moe_helpers import experts  # noqa: F401  (a session fixture)
