"""Fitness: how good a candidate model is. lm-eval tasks on a resident model and/or a
user's Python function, combined into one objective (weighted) or several (separate).

>>> fitness = Fitness(model, tokenizer, spec)   # builds tasks and requests once
>>> result = fitness()                          # after each in-place weight change
>>> result.objectives, result.metrics, result.error
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from evomerge.errors import EvomergeError
from evomerge.fitness.aggregate import objectives
from evomerge.fitness.lm_eval_tasks import TaskScorer
from evomerge.fitness.python_fitness import call, load_callable
from evomerge.fitness.spec import FitnessSpec, TaskSpec

__all__ = ["Fitness", "FitnessResult", "FitnessSpec", "TaskSpec"]


@dataclass
class FitnessResult:
    objectives: list[float] | None  # None when the candidate failed
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    python: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class Fitness:
    def __init__(self, model, tokenizer, spec: FitnessSpec):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.scorer = TaskScorer(model, tokenizer, spec) if spec.tasks else None
        self.fn = load_callable(spec.python) if spec.python else None

    def __call__(self) -> FitnessResult:
        """Score the model as its weights are now. A failing candidate (the Python fitness
        raising, NaN metrics) gives a result with ``error`` set, never an exception."""
        start = time.perf_counter()
        result = FitnessResult(None)
        try:
            if self.scorer is not None:
                result.metrics = self.scorer()
            if self.fn is not None:
                result.python = call(self.fn, self.model, self.tokenizer)
            result.objectives = objectives(result.metrics, self.spec, result.python)
        except EvomergeError as e:
            result.error = str(e)
        result.seconds = time.perf_counter() - start
        return result
