"""Experts kept whole: a router sends each prompt to the expert that knows it (docs/route.md).

``routers`` (the math) and ``folder`` (what a routed model folder holds) sit low, beside
``checkpoint/``, so that ``evaluate`` loads a routed folder through its one loading path;
``recipe``, ``build`` and ``cli`` (fitting a router and writing the folder) sit above ``evaluate``.
"""
