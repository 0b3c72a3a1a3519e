"""A Python fitness for benchmarks/search_throughput.py whose evaluation time varies 3x.

It reads the merged weights (so the score depends on the candidate) and then waits between
``BASE`` and ``3 * BASE`` seconds, the wait fixed by the weights (the same candidate always
takes the same time). Waiting instead of computing keeps the two CPUs free, so what is
measured is scheduling and overhead, not contention.
"""

from __future__ import annotations

import time

BASE = 0.1


def timed(model, tokenizer) -> float:
    w = model.model.layers[0].mlp.up_proj.weight
    score = float(w.double().mean()) * 1e3
    wait = BASE * (1 + 2 * ((abs(score) * 1e4) % 1.0))
    time.sleep(wait)
    return -abs(score - 0.01)
