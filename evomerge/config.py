"""The search configuration (one YAML file), validated with messages that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.fitness.spec import FitnessSpec, TaskSpec
from evomerge.validation import read_yaml, validate


class Models(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: Path
    experts: dict[str, Path] = Field(min_length=1)


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # default: the space's recommended optimizer
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_evals: int = Field(100, gt=0)
    time_limit: str | None = None  # "8h", "30m", "90s"
    target: float | None = None

    @field_validator("time_limit")
    @classmethod
    def _duration(cls, v):
        if v is not None:
            parse_duration(v)
        return v


class Workers(BaseModel):
    """Where candidates are evaluated: ``count`` Ray workers, or this process when 0."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(0, ge=0)  # 0: in-process, no Ray (for debugging)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the worker sees a GPU
    cpus_per_worker: int | None = Field(None, gt=0)  # default: the machine's CPUs / count (local)
    gpus_per_worker: float | None = Field(None, ge=0)  # default: 1 when device is cuda, else 0
    ray_address: str | None = None  # an existing Ray cluster; none: evomerge starts a local one
    max_retries: int = Field(2, ge=0)  # re-runs of a candidate whose worker died
    prefetch: int = Field(1, ge=0)  # candidates queued on each worker behind the one it runs
    dashboard: bool = False  # Ray's dashboard, for a locally started Ray


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: Models
    space: Path | dict
    fitness: FitnessSpec
    heldout: list[TaskSpec] = Field(default_factory=list)  # scored for the best at the end
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: Budget = Field(default_factory=Budget)
    workers: Workers = Field(default_factory=Workers)
    output: Path = Path("runs/search")
    storage: str | None = None  # an Optuna storage URL for the ledger; default sqlite:///OUTPUT/study.db

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> SearchConfig:
        path = Path(path)
        data = read_yaml(path, "search config")
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return validate(cls, data, str(path)).resolved(path.parent)

    def resolved(self, folder: Path) -> SearchConfig:
        """Relative paths are relative to the config file's folder; make them absolute."""

        def absolute(p: Path) -> Path:
            return p if p.is_absolute() else (folder / p).resolve()

        data = self.model_copy(deep=True)
        data.models.base = absolute(data.models.base)
        data.models.experts = {k: absolute(v) for k, v in data.models.experts.items()}
        if isinstance(data.space, Path):
            data.space = absolute(data.space)
        data.fitness.task_dirs = [absolute(d) for d in data.fitness.task_dirs]
        data.output = absolute(data.output)
        return data


def parse_duration(text: str) -> float:
    """'8h', '30m', '90s', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ValueError(f"cannot read duration {text!r}; write e.g. 8h, 30m or 90s") from None
