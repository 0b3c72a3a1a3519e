"""Fitness speed: seconds per candidate on the zoo's two-skill fitness, three ways, one run.

Each candidate is a task-arithmetic merge of the zoo's mergeable experts (a different lambda
per candidate), scored on zoo_add_ll + zoo_rev_ll (256 fitness examples each, loglikelihood).

- evomerge: one resident model; merge in place, then the resident lm-eval scorer
  (tasks and requests built once);
- on-disk loop: write the merged checkpoint, then `lm_eval.simple_evaluate` with a fresh
  model load and a fresh TaskManager per candidate (what an on-disk search loop does);
- floor: the same examples scored by direct batched forward passes in plain torch.

Also reported: the share of evomerge's time spent outside the model's forward passes
(timed with forward hooks). Writes benchmarks/results/fitness_speed.{md,json}.
mergekit-evolve is not run here: on this machine it needs several workarounds to start
at all (see ../shared/REFERENCE.md), and its per-candidate cost is the on-disk loop's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import Fitness, FitnessSpec
from evomerge.merge import merge, merge_into_model
from evomerge.recipe import MergeRecipe
from evomerge.zoo import load_zoo
from evomerge.zoo.score import greedy_correct
from evomerge.zoo.tasks import FIT, read_split

RESULTS = Path(__file__).parent / "results"
TASKS = ["zoo_add_ll", "zoo_rev_ll"]


def recipe(zoo, lam: float) -> MergeRecipe:
    return MergeRecipe.parse(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo.model("base")),
            "models": [
                {"model": str(zoo.model(n)), "parameters": {"weight": 1.0}}
                for n in zoo.expert_set("mergeable")
            ],
            "parameters": {"lambda": lam},
        }
    )


class ForwardTimer:
    """Wall time spent inside model.forward, via hooks."""

    def __init__(self, model):
        self.total = 0.0
        model.register_forward_pre_hook(lambda m, a: setattr(self, "_t", time.perf_counter()))
        model.register_forward_hook(
            lambda m, a, o: setattr(self, "total", self.total + time.perf_counter() - self._t)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--disk-candidates", type=int, default=3, help="the on-disk loop is slow; fewer")
    parser.add_argument("--out", type=Path, default=RESULTS / "fitness_speed")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    zoo = load_zoo()
    lambdas = [0.6 + 0.1 * i for i in range(args.candidates)]
    spec = FitnessSpec(tasks=[{"name": n} for n in TASKS], task_dirs=[zoo.tasks], batch_size=256)

    # evomerge: resident model, merged in place, scored by the resident lm-eval scorer
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(zoo.model("base"), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.model("base"))
    fitness = Fitness(model, tokenizer, spec)
    setup = time.perf_counter() - start
    timer = ForwardTimer(model)
    resident, merging, scoring, scores = [], [], [], []
    for lam in lambdas:
        t = time.perf_counter()
        merge_into_model(recipe(zoo, lam), model)  # re-planned per candidate, as a search does
        t_merged = time.perf_counter()
        result = fitness()
        done = time.perf_counter()
        resident.append(done - t)
        merging.append(t_merged - t)
        scoring.append(done - t_merged)
        scores.append(result.objectives[0])
    forward_share = timer.total / sum(scoring)

    # floor: the same examples, direct batched forward passes
    examples = [e for skill in ["add", "rev"] for e in read_split(zoo.tasks, skill, FIT)]
    floor = []
    for lam in lambdas:
        merge_into_model(recipe(zoo, lam), model)
        t = time.perf_counter()
        greedy_correct(model, tokenizer, examples, batch_size=256)
        floor.append(time.perf_counter() - t)

    # on-disk loop: write the checkpoint, fresh simple_evaluate with a fresh model load
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    disk, disk_scores = [], []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        for i, lam in enumerate(lambdas[: args.disk_candidates]):
            t = time.perf_counter()
            out = Path(tmp) / f"c{i}"
            merge(recipe(zoo, lam), out)
            os.chdir(zoo.tasks)  # lm-eval resolves data_files against the cwd
            try:
                res = simple_evaluate(
                    model="hf",
                    model_args=f"pretrained={out},device=cpu,dtype=float32",
                    tasks=TASKS,
                    task_manager=TaskManager(include_path=str(zoo.tasks)),
                    batch_size=256,
                )
            finally:
                os.chdir(cwd)
            disk.append(time.perf_counter() - t)
            disk_scores.append(sum(res["results"][n]["acc,none"] for n in TASKS))
    agree = all(abs(a - b) < 1e-9 for a, b in zip(scores, disk_scores, strict=False))

    med = statistics.median
    row = {
        "candidates": args.candidates,
        "examples": len(examples),
        "evomerge_s": med(resident),
        "evomerge_merge_s": med(merging),
        "evomerge_fitness_s": med(scoring),
        "evomerge_setup_s": setup,
        "disk_loop_s": med(disk),
        "floor_s": med(floor),
        "speedup_vs_disk": med(disk) / med(resident),
        "vs_floor": med(resident) / med(floor),
        "outside_forward_share": 1 - forward_share,
        "scores_agree_with_disk_loop": agree,
    }
    table = (
        "| way | seconds per candidate (median) |\n|---|---:|\n"
        f"| evomerge: resident model, merge in place + resident lm-eval scorer | {row['evomerge_s']:.3f} |\n"
        f"| of which: merge in place (planning included) | {row['evomerge_merge_s']:.3f} |\n"
        f"| of which: fitness (lm-eval requests on the resident model) | {row['evomerge_fitness_s']:.3f} |\n"
        f"| on-disk loop: write checkpoint + fresh `simple_evaluate` (model load, TaskManager) | {row['disk_loop_s']:.3f} |\n"
        f"| floor: direct batched forward passes, plain torch (no merge) | {row['floor_s']:.3f} |\n"
    )
    text = f"""# Fitness speed per candidate

Zoo two-skill fitness: {", ".join(TASKS)} ({len(examples)} examples, loglikelihood form), on
task-arithmetic merges of the mergeable experts (lambda {lambdas[0]:.1f}..{lambdas[-1]:.1f}),
{args.candidates} candidates ({args.disk_candidates} for the slow on-disk loop), batch 256, 2 CPU threads.

{table}
- evomerge vs on-disk loop: **{row["speedup_vs_disk"]:.1f}x** faster (target >= 10x)
- evomerge vs floor: **{row["vs_floor"]:.2f}x** the floor (target <= 3x); the evomerge figure includes the in-place merge
- share of the fitness call's time outside the model's forward passes: **{100 * row["outside_forward_share"]:.1f}%**
  (target < 20%; lm-eval's tokenization, batching, log-softmax and metric code)
- one-time set-up of the resident scorer (model load, tasks, requests): {setup:.2f} s
- scores equal between evomerge and the on-disk loop for the shared candidates: {agree}

Produced by `python benchmarks/fitness_speed.py` on {date.today()} ({platform.machine()}, torch {torch.__version__}).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(row, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
