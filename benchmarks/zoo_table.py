"""Does the toy zoo make merging matter? Scores every zoo model and a few merges.

Writes benchmarks/results/zoo.md. Run: `make bench` or `.venv/bin/python benchmarks/zoo_table.py`.
Each row is held-out accuracy (200 examples per skill, greedy exact match); the random
per-layer rows pick their best and worst on the fitness split and report held-out.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import torch

from evomerge.zoo import load_zoo
from evomerge.zoo.table import format_table, zoo_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=None, help="zoo directory (default: the prebuilt zoo)")
    parser.add_argument("--random", type=int, default=32, help="random per-layer merges to score")
    parser.add_argument("--out", type=Path, default=RESULTS / "zoo.md")
    args = parser.parse_args()

    torch.set_num_threads(2)
    zoo = load_zoo(args.zoo)
    start = time.perf_counter()
    rows = zoo_table(zoo, random_layerwise=args.random)
    seconds = time.perf_counter() - start
    pair = [zoo.manifest["models"][e]["skill"] for e in zoo.expert_set("mergeable")]
    table = format_table(rows, zoo.skills, pair)
    m = zoo.manifest
    text = f"""# The toy zoo: does merging matter?

Synthetic models and tasks (see `evomerge/zoo/`): {m["parameters"]:,}-parameter char-level
Llama models, held-out split of 200 examples per skill, greedy exact match (answer then
newline). `ar` needs both skills in one answer. Task arithmetic: base + lambda * sum of
task vectors; lambda=0.5 is the plain average of the experts.

{table}

Produced by `python benchmarks/zoo_table.py` on {date.today()} ({platform.machine()},
{torch.get_num_threads()} threads, torch {torch.__version__}) in {seconds:.0f} s.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
