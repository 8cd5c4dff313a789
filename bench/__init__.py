"""fastenc's benchmark suite: `python -m bench` (see bench/__main__.py) and `pytest bench/ --benchmark-only`.

Modules: cases (every op's cases, the single source), limits (device copy / GEMM limits), timing (how a call is
timed), runner (providers, oracle check, rows), report (table, schema, files, compare), plots (PNG per op).
"""
