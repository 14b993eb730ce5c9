"""Shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is
on ``sys.path``)."""

from __future__ import annotations

import time


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(the fastest of ``repeats`` calls of ``fn`` in seconds, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out
