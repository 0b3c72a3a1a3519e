"""The search loop: ask, decode, merge, score, record, tell; resumable.

Candidates go to a pool (:mod:`evomerge.pool`: Ray workers, or this process) and each result
is handled as it arrives, so a worker gets its next candidate as soon as it reports. The
ledger (``study.db``) is the source of truth for results: a trial is recorded before it is
told to the optimizer. The optimizer is never pickled: it is deterministic given its seed and
the sequence of asks and tells it saw, and that sequence is appended to ``optimizer.jsonl``
as it happens. Resuming rebuilds the optimizer from its seed and replays the journal; the
proposals that were out when the run stopped are evaluated again (or, if the ledger already
holds their result, told it). An interrupted and resumed run with one worker thus ends with
the same trials as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge.config import SearchConfig, parse_duration
from evomerge.errors import EvomergeError
from evomerge.ledger import Ledger
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
    busy_fraction: float = 0.0  # of the workers' time spent merging and scoring


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


class Journal:
    """``optimizer.jsonl``: a header naming the optimizer, then one line per ask or tell.
    Appends are flushed as they happen (a killed process loses nothing) and synced at each
    tell; a torn last line (a crash mid-write) is ignored on reading."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def start(self, header: dict) -> None:
        self.path.write_text(json.dumps(header) + "\n")

    def read(self, header: dict) -> list[list]:
        if not self.path.exists():
            raise EvomergeError(f"{self.path}: missing; this run cannot be resumed")
        lines = self.path.read_text().splitlines()
        events = []
        for i, line in enumerate(lines):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # torn by a crash while it was written
                raise EvomergeError(f"{self.path}:{i + 1}: not valid JSON; the journal is damaged") from None
            if i == 0:
                if item != header:
                    raise EvomergeError(
                        f"{self.path}: the run used optimizer {item}, the config now says {header}; "
                        "a run resumes with the optimizer it started with"
                    )
            else:
                events.append(item)
        return events

    def append(self, event: list) -> None:
        if self.file is None:
            self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if event[0] == "tell":
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def search(
    config: SearchConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    evaluate_hook: Callable[[int], None] | None = None,
) -> SearchSummary:
    """Run (or continue) a search until the budget is spent; see the module docstring."""
    from evomerge.pool import make_pool

    run_dir = config.output
    if not resume and (run_dir / "optimizer.jsonl").exists():
        raise EvomergeError(f"{run_dir}: holds a search already; `evomerge resume {run_dir}` continues it")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "best").mkdir(exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    space = load_space(config)
    name = config.optimizer.name or space.spec.optimizer or "cma"
    n_obj = len(config.fitness.tasks) if config.fitness.objectives == "separate" else 1
    with _Lock(run_dir):
        ledger = Ledger(run_dir, space, n_obj, storage=config.storage)
        optimizer = make_optimizer(name, space, seed=config.optimizer.seed, n_objectives=n_obj,
                                   **config.optimizer.options)  # fmt: skip
        journal = Journal(run_dir / "optimizer.jsonl")
        header = {"optimizer": name, "seed": config.optimizer.seed, "options": config.optimizer.options}
        if resume:
            optimizer.replay(journal.read(header))
        else:
            journal.start(header)
        optimizer.on_event = journal.append
        pool = make_pool(config, [space.base, *space.experts.values()], log)
        try:
            run = _Run(config, space, ledger, optimizer, pool, log)
            run.loop(evaluate_hook)
        finally:
            pool.close()
            journal.close()
        trials = ledger.trials()
        best_path = run_dir / "best" / "recipe.yaml"
        return SearchSummary(
            run_dir,
            len(trials),
            sum(t.state.name == "FAIL" for t in trials),
            run.best_value,
            best_path if best_path.exists() else None,
            time.perf_counter() - run.start,
            run.busy_fraction(),
        )


class _Run:
    """The state of one search session: what is in flight, the best so far, progress."""

    def __init__(self, config, space, ledger, optimizer, pool, log):
        self.config, self.space, self.ledger, self.optimizer, self.pool, self.log = (
            config, space, ledger, optimizer, pool, log
        )  # fmt: skip
        trials = ledger.trials()
        self.done = len(trials)  # the budget counts recorded trials
        self.recorded = {t.user_attrs["proposal"]: t for t in trials if "proposal" in t.user_attrs}
        self.seen = {  # recipe digest -> (objectives, attributes) of every evaluation so far
            t.user_attrs["recipe"]: (t.values if t.state.name == "COMPLETE" else None, dict(t.user_attrs))
            for t in trials
            if t.user_attrs.get("recipe")
        }
        best = ledger.best()
        self.best_value = best.values[0] if best else None
        self.in_flight: dict[int, tuple] = {}  # proposal id -> (proposal, recipe, digest)
        self.followers: dict[str, list] = {}  # digest in flight -> duplicates waiting for it
        self.retry = deque(optimizer.outstanding.values())  # out when the run stopped
        self.start, self.done_at_start, self.busy = time.perf_counter(), self.done, 0.0
        budget = config.budget
        self.deadline = time.monotonic() + parse_duration(budget.time_limit) if budget.time_limit else None

    def loop(self, evaluate_hook) -> None:
        while True:
            stop = self._stop_reason()
            if stop is None:
                self._fill(evaluate_hook)
            if not self.in_flight:
                if stop:
                    self.log(stop)
                elif self.done < self.config.budget.max_evals:
                    raise RuntimeError("optimizer proposed nothing with no evaluation in flight")
                return
            outcome = self.pool.next()
            proposal, recipe, digest = self.in_flight.pop(outcome.key)
            self.busy += outcome.attrs.get("merge_seconds", 0) + outcome.attrs.get("fitness_seconds", 0)
            attrs = {"recipe": digest, **outcome.attrs}
            self.seen.setdefault(digest, (outcome.objectives, attrs))
            self._settle(proposal, recipe, outcome.objectives, attrs)
            for follower in self.followers.pop(digest, []):
                self._settle(follower, recipe, outcome.objectives, {**attrs, "duplicate": True})

    def _stop_reason(self) -> str | None:
        target = self.config.budget.target
        if target is not None and self.best_value is not None and self.best_value >= target:
            return "target reached"
        if self.deadline and time.monotonic() > self.deadline:
            return "time limit reached"
        return None

    def _fill(self, evaluate_hook) -> None:
        """Give every free worker a candidate."""
        budget = self.config.budget.max_evals
        while self.pool.free > 0:
            if self.retry:
                proposal = self.retry.popleft()
            elif self.done + len(self.optimizer.outstanding) < budget:
                asked = self.optimizer.ask(1)
                if not asked:
                    return
                proposal = asked[0]
            else:
                return
            if proposal.id in self.recorded:  # its result reached the ledger before the stop
                self._tell_recorded(proposal)
                continue
            recipe = self.space.decode(proposal.genome, seed=self.config.optimizer.seed)
            digest = recipe.digest()
            if digest in self.seen:  # the same merge was evaluated already: reuse its result
                objectives, attrs = self.seen[digest]
                self._settle(proposal, recipe, objectives, {**attrs, "duplicate": True})
                continue
            if digest in self.followers:  # the same merge is being evaluated: wait for it
                self.followers[digest].append(proposal)
                continue
            if evaluate_hook:
                evaluate_hook(self.done)
            self.pool.submit(proposal.id, recipe)
            self.in_flight[proposal.id] = (proposal, recipe, digest)
            self.followers[digest] = []

    def _tell_recorded(self, proposal) -> None:
        trial = self.recorded[proposal.id]
        if proposal.genome != trial.params:
            raise EvomergeError(
                f"{self.ledger.url}: trial {trial.number} is not what the optimizer proposes on "
                "replay (were the config, space or seed changed?); cannot resume"
            )
        self.optimizer.tell(proposal.id, trial.values if trial.state.name == "COMPLETE" else None)

    def _settle(self, proposal, recipe, objectives, attrs) -> None:
        """Record (first: the ledger must never miss a result the optimizer has), tell, report."""
        self.ledger.record(proposal.genome, objectives, {**attrs, "proposal": proposal.id})
        self.optimizer.tell(proposal.id, objectives)
        self.done += 1
        if objectives is not None and (self.best_value is None or objectives[0] > self.best_value):
            self.best_value = objectives[0]
            recipe.save(self.config.output / "best" / "recipe.yaml")
        budget = self.config.budget.max_evals
        status = "failed" if objectives is None else f"{objectives[0]:.4f}"
        best = "-" if self.best_value is None else f"{self.best_value:.4f}"
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        eta = (budget - self.done) / rate if rate > 0 else float("inf")
        line = f"[{self.done}/{budget}] {status}  best {best}  {rate * 3600:.0f}/h  eta {_duration(eta)}"
        if objectives is None and attrs.get("error"):
            line += f"  ({attrs['error'][:120]})"
        self.log(line)
        with open(self.config.output / "search.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def busy_fraction(self) -> float:
        """Share of the workers' wall time spent merging and scoring (the rest is overhead)."""
        wall = (time.perf_counter() - self.start) * self.pool.size
        return self.busy / wall if wall > 0 else 0.0


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
