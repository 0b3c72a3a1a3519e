"""From per-task metrics to objectives: a weighted sum, or one objective per task."""

from __future__ import annotations

import math

from evomerge.errors import EvomergeError
from evomerge.fitness.spec import FitnessSpec

Metrics = dict[str, dict[str, float]]  # task label -> {"acc,none": 0.7, ...}


def pick(metrics: Metrics, spec: FitnessSpec) -> dict[str, float]:
    """The metric that counts for each task, by task label; errors name what is available."""
    out = {}
    for task in spec.tasks:
        have = metrics.get(task.label)
        if have is None:
            raise EvomergeError(f"task {task.label}: no results (have {', '.join(metrics) or 'none'})")
        if task.metric_key not in have:
            available = ", ".join(k for k in have if "_stderr" not in k)
            raise EvomergeError(f"task {task.label}: no metric {task.metric_key!r}; available: {available}")
        out[task.label] = float(have[task.metric_key])
    return out


def objectives(
    metrics: Metrics, spec: FitnessSpec, python_score: dict[str, float] | None = None
) -> list[float]:
    """``weighted``: [sum of weight * metric] (plus the Python score's values, weight 1);
    ``separate``: one value per task, in the spec's order, then the Python values."""
    chosen = pick(metrics, spec)
    extra = list((python_score or {}).values())
    if spec.objectives == "separate":
        values = [chosen[t.label] for t in spec.tasks] + extra
    else:
        values = [sum(t.weight * chosen[t.label] for t in spec.tasks) + sum(extra)]
    if not all(math.isfinite(v) for v in values):
        raise EvomergeError(f"fitness is not finite: {values}")
    return values
