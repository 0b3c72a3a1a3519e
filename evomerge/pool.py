"""Where candidates are merged and scored: in this process, or on Ray workers.

Both pools take recipes with ``submit(key, recipe)`` while ``free`` > 0 and hand back one
:class:`Outcome` per call to ``next()``, as soon as any candidate finishes, so the search
gives a worker its next candidate the moment it reports (no generation barrier). Ray workers
also hold ``prefetch`` candidates queued behind the one they run, so a worker never waits
while the driver records a result and asks the optimizer for the next one.

- :class:`LocalPool` (``workers.count: 0``): one :class:`Evaluator` in this process.
- :class:`RayPool`: ``count`` Ray actors, each an :class:`Evaluator`. The source checkpoints
  are read once by the driver and put in Ray's object store; every worker on a machine maps
  the same bytes read-only (zero-copy) and merges from them into its resident model. A
  worker whose candidate raises reports the failure; a worker that dies (killed, out of
  memory) is replaced and its candidate re-run up to ``max_retries`` times, then recorded as
  failed. Evomerge starts a local Ray sized for the workers (no dashboard unless asked), or
  joins a cluster given by ``ray_address``; a Ray already started in this process is reused.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError
from evomerge.fitness import Fitness, FitnessResult
from evomerge.merge import merge_into_model
from evomerge.recipe import MergeRecipe


@dataclass
class Outcome:
    key: int
    objectives: list[float] | None  # None: the candidate failed (attrs["error"] says why)
    attrs: dict = field(default_factory=dict)


def pick_device(wanted: str) -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise EvomergeError("workers.device: cuda, but no CUDA device is visible here")
    return "cuda" if wanted in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


class Evaluator:
    """One resident model and its fitness: each call merges a recipe into the model in place
    and scores it. Nothing a candidate does raises out of here: any exception is the
    candidate's failure, with its message."""

    def __init__(self, config: SearchConfig, readers: dict | None = None, worker: str = "main"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(config.workers.device)
        base = config.models.base
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
        self.fitness = Fitness(self.model, AutoTokenizer.from_pretrained(base), config.fitness)
        self.readers = {} if readers is None else readers  # source checkpoints, kept open
        self.worker = worker

    def __call__(self, recipe: MergeRecipe) -> tuple[list[float] | None, dict]:
        start = time.perf_counter()
        merged = None
        try:
            merge_into_model(recipe, self.model, readers=self.readers)
            merged = time.perf_counter()
            result = self.fitness()
        except Exception as e:  # noqa: BLE001 (one candidate never stops the search)
            result = FitnessResult(None, error=str(e) if isinstance(e, EvomergeError) else _describe(e))
        end = time.perf_counter()
        merged = merged or end
        return result.objectives, {
            "merge_seconds": round(merged - start, 4),
            "fitness_seconds": round(end - merged, 4),
            "metrics": json.dumps(result.metrics),
            "error": result.error,
            "worker": self.worker,
        }


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class LocalPool:
    """Evaluates in this process, one candidate at a time."""

    size = 1

    def __init__(self, config: SearchConfig):
        self.evaluator = Evaluator(config)
        self.queue: deque = deque()

    @property
    def free(self) -> int:
        return self.size - len(self.queue)

    def submit(self, key: int, recipe: MergeRecipe) -> None:
        self.queue.append((key, recipe))

    def next(self) -> Outcome:
        key, recipe = self.queue.popleft()
        return Outcome(key, *self.evaluator(recipe))

    def close(self) -> None:
        self.queue.clear()


class _RayWorker:
    """The body of one Ray actor (wrapped with ``ray.remote`` by :class:`RayPool`)."""

    def __init__(self, config: dict, sources: dict, sys_path: list[str], threads: int, name: str):
        import ray

        from evomerge.allocator import keep_freed_memory
        from evomerge.checkpoint.memory import MemoryCheckpoint

        keep_freed_memory()
        sys.path.extend(p for p in sys_path if p not in sys.path)  # the driver's modules (python fitness)
        torch.set_num_threads(threads)
        packed = ray.get(list(sources.values()))
        readers = {model: MemoryCheckpoint(p) for model, p in zip(sources, packed, strict=True)}
        self.evaluator = Evaluator(SearchConfig.model_validate(config), readers, worker=name)

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self, recipe: MergeRecipe) -> tuple[list[float] | None, dict]:
        return self.evaluator(recipe)


@dataclass
class _Task:
    key: int
    recipe: MergeRecipe
    slot: int
    actor: object = None  # the actor it was sent to
    attempts: int = 1


class RayPool:
    """``workers.count`` Ray actors fed asynchronously; see the module docstring."""

    def __init__(self, config: SearchConfig, models: list[str], log: Callable[[str], None] = print):
        import ray

        self.ray, self.log, self.config = ray, log, config
        w = config.workers
        self.size = w.count
        self.owns_ray = not ray.is_initialized()
        local = self.owns_ray and not w.ray_address
        cpus = w.cpus_per_worker or (max(1, (os.cpu_count() or 1) // w.count) if local else 1)
        if self.owns_ray:
            self._start_ray(w, cpus)
        gpus = w.gpus_per_worker
        if gpus is None:
            has_gpus = ray.cluster_resources().get("GPU", 0) >= w.count
            gpus = 1.0 if w.device == "cuda" or (w.device == "auto" and has_gpus) else 0.0
        self._check_resources(cpus, gpus)
        started = time.perf_counter()
        self.sources = self._share(models)
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        self.actor = ray.remote(_RayWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, runtime_env={"env_vars": env} if env else None
        )
        self.threads = cpus
        self.workers = [self._spawn(i) for i in range(self.size)]
        try:
            ray.get([a.ready.remote() for a in self.workers])
        except ray.exceptions.RayError as e:
            self.close()
            raise EvomergeError(f"Ray workers could not start: {_cause(e)}") from None
        each = f"{cpus} CPU" + ("s" if cpus > 1 else "") + (f", {gpus:g} GPU" if gpus else "")
        log(f"{self.size} Ray workers ready ({each} each) in {time.perf_counter() - started:.1f} s")
        self.depth = 1 + w.prefetch  # candidates on each worker: one running, the rest queued
        self.load = [0] * self.size  # candidates on each worker now
        self.running: dict = {}  # ObjectRef -> _Task

    def _start_ray(self, w, cpus: int) -> None:
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
        if w.ray_address:
            try:
                self.ray.init(address=w.ray_address, **kwargs)
            except Exception as e:  # noqa: BLE001 (ray raises many kinds here)
                raise EvomergeError(
                    f"workers.ray_address {w.ray_address!r}: cannot connect ({_cause(e)})"
                ) from None
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.ray.init(
            num_cpus=max(os.cpu_count() or 1, w.count * cpus), include_dashboard=w.dashboard, **kwargs
        )

    def _check_resources(self, cpus: int, gpus: float) -> None:
        """Enough free CPUs/GPUs for every worker, or a clear error (never a silent wait).
        Resources of actors killed a moment ago come back asynchronously: wait a little."""
        n, deadline = self.size, time.monotonic() + 30
        while True:
            free = self.ray.available_resources()
            short = [(what, n * each) for what, each in (("CPU", cpus), ("GPU", gpus))
                     if each and free.get(what, 0) < n * each - 1e-9]  # fmt: skip
            if not short:
                return
            total = self.ray.cluster_resources()
            if time.monotonic() > deadline or any(total.get(w, 0) < need - 1e-9 for w, need in short):
                what, need = short[0]
                self.close()
                raise EvomergeError(
                    f"workers.count: {n} workers need {need:g} {what}s but Ray has {free.get(what, 0):g} "
                    "free; lower workers.count or cpus_per_worker/gpus_per_worker"
                )
            time.sleep(0.2)

    def _share(self, models: list[str]) -> dict:
        """Each source checkpoint into the object store, once."""
        from evomerge.checkpoint import CheckpointReader
        from evomerge.checkpoint.memory import pack

        refs = {}
        for model in dict.fromkeys(models):
            refs[model] = self.ray.put(pack(CheckpointReader(model)))
        return refs

    def _spawn(self, slot: int):
        return self.actor.remote(
            self.config.model_dump(mode="json"),
            self.sources,
            [p for p in sys.path if p],
            self.threads,
            f"ray-{slot}",
        )

    @property
    def free(self) -> int:
        return self.size * self.depth - sum(self.load)

    def submit(self, key: int, recipe: MergeRecipe) -> None:
        slot = min(range(self.size), key=self.load.__getitem__)  # the least loaded worker
        self.load[slot] += 1
        self._run(_Task(key, recipe, slot))

    def _run(self, task: _Task) -> None:
        task.actor = self.workers[task.slot]
        self.running[task.actor.evaluate.remote(task.recipe)] = task

    def next(self) -> Outcome:
        ray = self.ray
        while True:
            [ref], _ = ray.wait(list(self.running), num_returns=1)
            task = self.running.pop(ref)
            try:
                objectives, attrs = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # raised outside the evaluator's guard
                error = f"worker raised {_cause(e)}"
                objectives, attrs = None, {"error": error, "worker": f"ray-{task.slot}"}
            except ray.exceptions.RayError as e:  # the worker process died
                if task.actor is self.workers[task.slot]:  # (not replaced yet for another task of it)
                    self._replace(task.slot, e)
                if task.attempts <= self.config.workers.max_retries:
                    task.attempts += 1
                    self._run(task)
                    continue
                objectives, attrs = (
                    None,
                    {
                        "error": f"worker died {task.attempts} times evaluating it (last: {_cause(e)})",
                        "worker": f"ray-{task.slot}",
                    },
                )
            self.load[task.slot] -= 1
            attrs["attempts"] = task.attempts
            return Outcome(task.key, objectives, attrs)

    def _replace(self, slot: int, error: Exception) -> None:
        self.log(f"worker ray-{slot} died ({_cause(error)}); starting a new one")
        self.ray.kill(self.workers[slot], no_restart=True)
        self.workers[slot] = self._spawn(slot)

    def close(self) -> None:
        for worker in getattr(self, "workers", []):
            self.ray.kill(worker, no_restart=True)
        self.workers, self.running = [], {}
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()


_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_OFFLINE")


def _cause(e: BaseException) -> str:
    """The first line that says what went wrong, without Ray's wrapping."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return _describe(cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def make_pool(config: SearchConfig, models: list[str], log: Callable[[str], None] = print):
    if config.workers.count == 0:
        return LocalPool(config)
    return RayPool(config, models, log)
