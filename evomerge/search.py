"""The search loop: ask, decode, merge in place, score, record, tell; resumable.

This is the in-process loop (``workers.count: 0``): one resident model, merged into in place
for every candidate. The ledger is the single source of truth: a trial is recorded before it
is told to the optimizer, and resuming rebuilds the optimizer from its seed and replays the
ledger's trials through ask/tell (the same proposals come back, the recorded results are told
without evaluating again). An interrupted and resumed run thus ends with the same trials as an
uninterrupted one, and no optimizer state file has to be trusted or kept in step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from evomerge.config import SearchConfig, parse_duration
from evomerge.errors import EvomergeError
from evomerge.fitness import Fitness, FitnessResult
from evomerge.ledger import Ledger
from evomerge.merge import merge_into_model
from evomerge.optimizers import make_optimizer
from evomerge.space import SearchSpace, SpaceSpec


@dataclass
class SearchSummary:
    run_dir: Path
    trials: int
    failures: int
    best_value: float | None
    best_recipe: Path | None
    seconds: float


def load_space(config: SearchConfig) -> SearchSpace:
    experts = {k: str(v) for k, v in config.models.experts.items()}
    if isinstance(config.space, dict):
        return SearchSpace(SpaceSpec.model_validate(config.space), config.models.base, experts)
    return SearchSpace.load(config.space, config.models.base, experts)


class _Lock:
    """One search per run directory: a lock file holding the owner's pid."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        if self.path.exists():
            pid = int(self.path.read_text() or 0)
            if pid and _alive(pid):
                raise EvomergeError(f"{self.path.parent}: a search (pid {pid}) is already running here")
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def search(
    config: SearchConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    evaluate_hook: Callable[[int], None] | None = None,
) -> SearchSummary:
    """Run (or continue) a search until the budget is spent; see the module docstring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = config.output
    if config.workers.count > 0:
        raise EvomergeError(
            f"workers.count: {config.workers.count} Ray workers are not available yet; use 0 (in-process)"
        )
    if not resume and (run_dir / "study.db").exists():
        raise EvomergeError(f"{run_dir}: holds a search already; `evomerge resume {run_dir}` continues it")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "best").mkdir(exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    space = load_space(config)
    name = config.optimizer.name or space.spec.optimizer or "cma"
    n_obj = len(config.fitness.tasks) if config.fitness.objectives == "separate" else 1
    with _Lock(run_dir):
        ledger = Ledger(run_dir, space, n_obj)
        optimizer = make_optimizer(name, space, seed=config.optimizer.seed, n_objectives=n_obj,
                                   **config.optimizer.options)  # fmt: skip
        device = "cuda" if config.workers.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        model = (
            AutoModelForCausalLM.from_pretrained(config.models.base, dtype=torch.float32).to(device).eval()
        )
        tokenizer = AutoTokenizer.from_pretrained(config.models.base)
        fitness = Fitness(model, tokenizer, config.fitness)
        deadline = (
            time.monotonic() + parse_duration(config.budget.time_limit) if config.budget.time_limit else None
        )
        seen = {  # recipe digest -> (objectives, attributes) of every evaluation so far
            t.user_attrs["recipe"]: (t.values if t.state.name == "COMPLETE" else None, dict(t.user_attrs))
            for t in ledger.trials()
            if t.user_attrs.get("recipe")
        }
        told = _replay(ledger, optimizer) if resume else 0
        readers = {}  # checkpoints stay open for the whole search
        best = ledger.best()
        best_value = best.values[0] if best else None
        start, told_at_start = time.perf_counter(), told
        while told < config.budget.max_evals:
            if deadline and time.monotonic() > deadline:
                log("time limit reached")
                break
            proposals = optimizer.ask(1)
            if not proposals:
                raise RuntimeError("optimizer proposed nothing with no evaluation in flight")
            p = proposals[0]
            recipe = space.decode(p.genome, seed=config.optimizer.seed)
            digest = recipe.digest()
            if evaluate_hook:
                evaluate_hook(told)
            objectives, attrs = _evaluate(recipe, digest, model, fitness, seen, readers)
            ledger.record(p.genome, objectives, attrs)
            seen.setdefault(digest, (objectives, attrs))
            optimizer.tell(p.id, objectives)
            told += 1
            if objectives is not None and (best_value is None or objectives[0] > best_value):
                best_value = objectives[0]
                recipe.save(run_dir / "best" / "recipe.yaml")
            status = "failed" if objectives is None else f"{objectives[0]:.4f}"
            best_text = "-" if best_value is None else f"{best_value:.4f}"
            elapsed = time.perf_counter() - start
            rate = (told - told_at_start) / elapsed if elapsed > 0 else 0.0
            eta = (config.budget.max_evals - told) / rate if rate > 0 else float("inf")
            line = (f"[{told}/{config.budget.max_evals}] {status}  best {best_text}  "
                    f"{rate * 3600:.0f}/h  eta {_duration(eta)}")  # fmt: skip
            log(line)
            with open(run_dir / "search.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            if (
                config.budget.target is not None
                and best_value is not None
                and best_value >= config.budget.target
            ):
                log("target reached")
                break
        trials = ledger.trials()
        failures = sum(t.state.name == "FAIL" for t in trials)
        best_path = run_dir / "best" / "recipe.yaml"
        return SearchSummary(
            run_dir,
            len(trials),
            failures,
            best_value,
            best_path if best_path.exists() else None,
            time.perf_counter() - start,
        )


def _replay(ledger: Ledger, optimizer) -> int:
    """Bring a fresh optimizer to where the recorded run was: ask, check the proposal is the
    recorded one, tell the recorded result. Returns the number of trials replayed."""
    trials = ledger.trials()
    for trial in trials:
        [p] = optimizer.ask(1)
        if p.genome != trial.params:
            raise EvomergeError(
                f"{ledger.url}: trial {trial.number} is not what the optimizer proposes on replay "
                "(were the config, space or seed changed?); cannot resume"
            )
        optimizer.tell(p.id, trial.values if trial.state.name == "COMPLETE" else None)
    return len(trials)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _evaluate(
    recipe, digest, model, fitness: Fitness, seen: dict, readers: dict
) -> tuple[list[float] | None, dict]:
    """Merge into the resident model and score it; a recipe already evaluated is not
    evaluated again (its result is reused and the trial marked as a duplicate)."""
    if digest in seen:
        objectives, attrs = seen[digest]
        return objectives, {**attrs, "duplicate": True}
    t0 = time.perf_counter()
    try:
        merge_into_model(recipe, model, readers=readers)
        merged = time.perf_counter()
        result = fitness()
    except EvomergeError as e:
        merged = time.perf_counter()
        result = FitnessResult(None, error=str(e))
    attrs = {
        "recipe": digest,
        "merge_seconds": round(merged - t0, 4),
        "fitness_seconds": round(time.perf_counter() - merged, 4),
        "metrics": json.dumps(result.metrics),
        "error": result.error,
    }
    return result.objectives, attrs
