"""The fitness specification: which tasks, which metric of each, how they combine."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TaskSpec(BaseModel):
    """One lm-eval task and the metric of it that counts.

    ``metric`` is named as lm-eval reports it, ``acc,none`` or ``exact_match,strip``; a bare
    ``acc`` means the ``none`` filter. ``split`` overrides the task's ``test_split`` (score a
    held-out split of the same task).
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    metric: str = "acc"
    weight: float = 1.0
    split: str | None = None

    @property
    def metric_key(self) -> str:
        return self.metric if "," in self.metric else f"{self.metric},none"

    @property
    def label(self) -> str:
        return f"{self.name}@{self.split}" if self.split else self.name


class FitnessSpec(BaseModel):
    """What "good" means for a candidate: lm-eval tasks and/or a Python function.

    >>> FitnessSpec(tasks=[{"name": "zoo_add_ll"}, {"name": "zoo_rev_ll", "weight": 2}],
    ...             task_dirs=["tasks/"], limit=256)
    """

    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskSpec] = Field(default_factory=list)
    task_dirs: list[Path] = Field(default_factory=list)
    limit: int | None = Field(None, gt=0, description="examples per task: a fixed, seeded subset")
    seed: int = 1234  # of the subset
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(64, gt=0)
    max_length: int | None = Field(None, gt=0)
    python: str | None = None  # "package.module:function"
    objectives: Literal["weighted", "separate"] = "weighted"

    @field_validator("python")
    @classmethod
    def _callable(cls, v):
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"must look like package.module:function, got {v!r}")
        return v

    @model_validator(mode="after")
    def _something(self):
        if not self.tasks and not self.python:
            raise ValueError("give at least one task or a python function")
        labels = [t.label for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ValueError("a task (and split) is listed twice")
        return self
