"""Search throughput: candidates per hour and how busy the workers are, in one run.

Two workloads on the toy zoo (examples/zoo-search.yaml's space and models):
- zoo fitness: the real two-task lm-eval fitness (~0.2 s of CPU per candidate);
- varying: a Python fitness that waits 0.1-0.3 s, the time fixed by the candidate
  (benchmarks/throughput_fitness.py), so evaluation times vary 3x between candidates;
  waiting leaves the CPUs free, so 4 workers (on 4 logical Ray CPUs) fit on this machine.

Ways of running them:
- evomerge in-process (workers.count 0), and with 1 and 2 Ray workers: the real
  `evomerge.search.search` with its ledger, journal and asynchronous dispatch;
- generational: the same Ray workers driven the way mergekit-evolve's loop drives them:
  ask a whole CMA-ES generation, evaluate it, wait for the slowest member, tell, repeat.

Busy = the workers' seconds spent merging and scoring / (wall seconds x workers), measured
from the first candidate to the last result (worker start-up, reported apart, excluded);
idle fraction = 1 - busy. Overhead per candidate = the wall time a worker is not merging or
scoring, per candidate. On this 2-CPU machine the driver (ledger, optimizer) shares the CPUs
with the workers, which the zoo-fitness rows include. Writes
benchmarks/results/search_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402

from evomerge.config import SearchConfig  # noqa: E402
from evomerge.optimizers import make_optimizer  # noqa: E402
from evomerge.pool import RayPool  # noqa: E402
from evomerge.search import load_space, search  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "zoo-search.yaml"
RESULTS = HERE / "results"


def make_config(out: Path, workload: str, workers: int, evals: int, prefetch: int = 1) -> SearchConfig:
    overrides = {"output": str(out), "budget.max_evals": evals, "workers.count": workers,
                 "workers.prefetch": prefetch, "optimizer.name": "optuna-cmaes",
                 "workers.cpus_per_worker": max(1, (os.cpu_count() or 1) // max(workers, 1))}  # fmt: skip
    if workload == "varying":  # pycma with a generation of 8, as the generational loop uses
        overrides.update({"fitness.python": "throughput_fitness:timed", "optimizer.name": "cma",
                          "optimizer.options": {"popsize": 8}, "workers.cpus_per_worker": 1})  # fmt: skip
    cfg = SearchConfig.load(EXAMPLE, overrides)
    if workload == "varying":
        cfg.fitness.tasks = []
    return cfg


def evomerge_run(workload: str, workers: int, evals: int, scratch: Path) -> dict:
    out = scratch / f"{workload}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = make_config(out, workload, workers, evals)
    started = time.perf_counter()
    lines = []
    summary = search(cfg, log=lines.append)
    total = time.perf_counter() - started
    return row("evomerge" + (" in-process" if workers == 0 else ""), workload, max(workers, 1), evals,
               summary.seconds, summary.busy_fraction, total - summary.seconds)  # fmt: skip


def generational_run(workload: str, workers: int, evals: int, scratch: Path) -> dict:
    """mergekit-evolve's shape: a generation is asked, all of it evaluated, then told."""
    cfg = make_config(scratch / f"gen-{workload}-{workers}", workload, workers, evals, prefetch=0)
    space = load_space(cfg)
    optimizer = make_optimizer("cma", space, seed=0, popsize=8)
    t0 = time.perf_counter()
    pool = RayPool(cfg, [space.base, *space.experts.values()], log=lambda _: None)
    startup = time.perf_counter() - t0
    done, busy = 0, 0.0
    start = time.perf_counter()
    try:
        while done < evals:
            generation = {p.id: p for p in optimizer.ask(min(8, evals - done))}
            queue = list(generation.values())
            results = {}
            while len(results) < len(generation):
                while queue and pool.free:
                    p = queue.pop(0)
                    pool.submit(p.id, space.decode(p.genome, seed=0))
                outcome = pool.next()
                busy += outcome.attrs["merge_seconds"] + outcome.attrs["fitness_seconds"]
                results[outcome.key] = outcome.objectives
            for pid, objectives in results.items():  # the barrier: told only when all are back
                optimizer.tell(pid, objectives)
            done += len(generation)
    finally:
        pool.close()
    wall = time.perf_counter() - start
    return row("generational (mergekit-evolve's loop)", workload, workers, evals, wall, busy / (wall * workers),
               startup)  # fmt: skip


def row(way, workload, workers, evals, wall, busy, startup) -> dict:
    per_candidate = wall * workers / evals
    return {
        "way": way,
        "workload": workload,
        "workers": workers,
        "candidates": evals,
        "wall_s": round(wall, 2),
        "per_hour": round(evals / wall * 3600),
        "busy": round(busy, 4),
        "idle_fraction": round(1 - busy, 4),
        "overhead_ms_per_candidate": round(per_candidate * (1 - busy) * 1000, 1),
        "startup_s": round(startup, 1),
    }


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# Search throughput",
        "",
        f"{date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"ray {ray.__version__}. `python benchmarks/search_throughput.py` "
        f"({args.evals} zoo-fitness / {args.varying_evals} varying candidates per row).",
        "",
        "| workload | way | workers | candidates/hour | idle fraction | overhead ms/candidate | wall s | start-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['way']} | {r['workers']} | {r['per_hour']:,} | {r['idle_fraction']:.1%} | "
            f"{r['overhead_ms_per_candidate']} | {r['wall_s']} | {r['startup_s']} |"
        )
    lines += [
        "",
        "Idle fraction = 1 - (seconds the workers spent merging and scoring) / (wall x workers), from the",
        "first candidate to the last result. Overhead = that idle time per candidate: what the search costs",
        "outside merge and fitness. Start-up (Ray, sharing the sources, loading each worker's model and",
        "tasks) is paid once per run and reported apart.",
        "",
        "Reading it: with evaluation times varying 3x, a generation barrier leaves workers waiting for the",
        "slowest member of each generation, and more so the more workers share a generation (popsize 8",
        "here); evomerge hands each worker its next candidate when it reports, with one more queued behind",
        "it, so its idle time stays at the tail of the run and Ray's per-call cost. The varying rows' 4",
        "workers run on 4 logical Ray CPUs (they mostly wait). In the zoo-fitness rows the driver (ledger",
        "write ~30 ms and optimizer ask per candidate) shares the 2 CPUs with the workers: in-process it",
        "runs between candidates (the 9% idle), with one Ray worker it runs beside the worker's two torch",
        "threads and slows them, so one Ray worker is not faster than in-process on this machine even",
        "though the worker is almost never idle; two workers are.",
    ]
    return "\n".join(lines) + "\n"


def settle() -> None:
    """Wait until the previous row's workers are gone and their CPUs free again."""
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0)
    if free < total:
        print(f"note: only {free:g} of {total:g} CPUs came back after 60 s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=150, help="candidates per zoo-fitness row")
    parser.add_argument("--varying-evals", type=int, default=96, help="candidates per varying row")
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.WARNING)
    sys.path.insert(0, str(HERE))  # throughput_fitness, for the workers too
    # 4 logical CPUs, so that 4 (mostly waiting) workers fit on a 2-CPU machine
    cpus = max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="evomerge-throughput-") as tmp:
        scratch = Path(tmp)
        runs = []
        for w in (4, 2, 1):
            runs += [(evomerge_run, "varying", w, args.varying_evals),
                     (generational_run, "varying", w, args.varying_evals)]  # fmt: skip
        runs += [(evomerge_run, "zoo fitness", w, args.evals) for w in (0, 1, 2)]
        for fn, workload, workers, evals in runs:
            settle()
            rows.append(fn(workload, workers, evals, scratch))
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_throughput.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "search_throughput.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
