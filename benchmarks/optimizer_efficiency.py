"""Optimizer efficiency: evaluations each backend needs to reach a target, against random search.

Synthetic objectives shaped like merge landscapes: bounded in the unit cube, noisy, tens of
dimensions, optimum away from the starting point (the space's ``initial()`` genome):

- ``sphere``: -|u - c|^2 (separable);
- ``ellipsoid``: a rotated, ill-conditioned quadratic (condition 100): genes interact, as
  per-layer weights of one expert do.

Dimensions 12 and 24 are the zoo's task-arithmetic and TIES/DARE layer-wise spaces. The target
is 10% of the starting point's squared error, judged on the noise-free value of the best
proposal so far. Writes benchmarks/results/optimizer_efficiency.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np

from evomerge.optimizers import make_optimizer
from evomerge.space import SearchSpace, SpaceSpec
from evomerge.zoo import load_zoo

RESULTS = Path(__file__).parent / "results"
NOISE = 0.01


def make_space(dimension: int) -> SearchSpace:
    zoo = load_zoo()
    params = {"weight": {"low": 0.0, "high": 1.5, "scope": ["group", "model"], "initial": 1.0}}
    if dimension == 24:
        params["density"] = {"low": 0.1, "high": 1.0, "scope": ["group", "model"], "initial": 1.0}
    spec = SpaceSpec(merge_method="dare_ties" if dimension == 24 else "task_arithmetic", parameters=params)
    space = SearchSpace(spec, zoo.model("base"), {"add": zoo.model("add"), "rev": zoo.model("rev")})
    assert space.dimension == dimension, space.dimension
    return space


def landscape(kind: str, dimension: int, seed: int):
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.15, 0.85, dimension)
    if kind == "sphere":
        matrix = np.eye(dimension)
    else:
        q, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
        matrix = q @ np.diag(np.logspace(0, 2, dimension) / 10) @ q.T

    def error(x: np.ndarray) -> float:
        d = x - centre
        return float(d @ matrix @ d)

    return error


def run_one(name: str, kind: str, dimension: int, seed: int, budget: int) -> tuple[int | None, float]:
    space = make_space(dimension)
    names = [g.name for g in space.genes]
    error = landscape(kind, dimension, seed)
    start = error(np.array([space.initial()[n] for n in names]))
    goal = 0.1 * start
    noise = np.random.default_rng(1000 + seed)
    opt = make_optimizer(name, space, seed=seed)
    done, t0 = 0, time.perf_counter()
    while done < budget:
        for p in opt.ask(min(4, budget - done)):
            e = error(np.array([p.genome[n] for n in names]))
            opt.tell(p.id, [-e + noise.normal(0, NOISE)])
            done += 1
            if e <= goal:
                return done, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=600)
    parser.add_argument(
        "--optimizers", nargs="*", default=["cma", "optuna-cmaes", "tpe", "nsga2", "qmc", "random"]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "optimizer_efficiency")
    args = parser.parse_args()
    rows = []
    for kind in ["sphere", "ellipsoid"]:
        for dimension in [12, 24]:
            for name in args.optimizers:
                evals, secs = [], []
                for seed in range(args.seeds):
                    n, s = run_one(name, kind, dimension, seed, args.budget)
                    evals.append(n)
                    secs.append(s)
                reached = [e for e in evals if e is not None]
                row = {
                    "landscape": kind, "dimension": dimension, "optimizer": name,
                    "reached": len(reached), "seeds": args.seeds,
                    "median_evals": statistics.median(e if e is not None else args.budget + 1 for e in evals),
                    "evals": evals, "seconds_per_run": statistics.mean(secs),
                }  # fmt: skip
                rows.append(row)
                print(f"{kind:<10} d={dimension:<3} {name:<13} reached {len(reached)}/{args.seeds}  "
                      f"median evals {row['median_evals']}  ({row['seconds_per_run']:.1f} s/run)", flush=True)  # fmt: skip

    def cell(r):
        med = r["median_evals"]
        return f"{med:.0f}" if med <= args.budget else f">{args.budget}"

    header = (
        "| landscape | d | " + " | ".join(args.optimizers) + " |\n|---|---:|" + "---:|" * len(args.optimizers)
    )
    lines = []
    for kind in ["sphere", "ellipsoid"]:
        for dimension in [12, 24]:
            sel = {r["optimizer"]: r for r in rows if r["landscape"] == kind and r["dimension"] == dimension}
            cells = [f"{cell(sel[o])} ({sel[o]['reached']}/{args.seeds})" for o in args.optimizers]
            lines.append(f"| {kind} | {dimension} | " + " | ".join(cells) + " |")
    table = "\n".join([header, *lines])
    text = f"""# Optimizer efficiency: evaluations to reach the target

Median evaluations (over {args.seeds} seeds) until the best proposal's noise-free squared error is
10% of the starting genome's; in brackets, how many seeds reached it within {args.budget}
evaluations ("> {args.budget}": the median run did not). Noise sd {NOISE}; proposals asked 4 at a
time, as 4 workers would. Lower is better; random search is the baseline.

{table}

Produced by `python benchmarks/optimizer_efficiency.py` on {date.today()}.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
