"""Merging into a resident model: written straight into its parameters vs made apart and copied in.

Every candidate of a search is merged into the worker's resident model (``merge_into_model``).
For elementwise methods (linear, task arithmetic, TIES/DARE, SLERP) whose result has the
parameter's dtype, the engine writes each block of the result into the parameter itself; the
alternative, in the same run, is the same merge made into a fresh tensor and then copied into
the parameter (what a sink without ``destination`` gets). Same checkpoints as merge_speed.py
(synthetic Llama-shaped bf16 models), page cache warm, median of --repeat runs per mode,
the two modes alternating. Writes benchmarks/results/resident_merge.{md,json}.

    .venv/bin/python benchmarks/resident_merge.py             # 4 layers, ~0.5B parameters per model
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from merge_speed import RESULTS, make_models, recipes  # noqa: E402

from evomerge.allocator import keep_freed_memory  # noqa: E402
from evomerge.merge import ModelSink, execute, plan_merge  # noqa: E402
from evomerge.recipe import MergeRecipe  # noqa: E402


class CopyInSink(ModelSink):
    """The resident sink without ``destination``: every result is a new tensor, copied in."""

    destination = None


def run(plan, model, sink_type) -> float:
    sink = sink_type(model)
    start = time.perf_counter()
    execute(plan, sink)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "resident_merge")
    args = parser.parse_args()
    keep_freed_memory()  # as in a search worker
    from transformers import AutoModelForCausalLM

    models = make_models(args.work, args.hidden, args.layers, args.vocab)
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for name in ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"]:
        plan = plan_merge(MergeRecipe.parse(recipes(models)[name]))
        run(plan, model, ModelSink)  # warm-up: page cache, allocator
        times = {"direct": [], "copy_in": []}
        for _ in range(args.repeat):
            times["direct"].append(run(plan, model, ModelSink))
            times["copy_in"].append(run(plan, model, CopyInSink))
        copied = {n: p.detach().clone() for n, p in model.named_parameters()}
        run(plan, model, ModelSink)
        same = all(torch.equal(p, copied[n]) for n, p in model.named_parameters())
        del copied
        direct, copy_in = (statistics.median(times[k]) for k in ("direct", "copy_in"))
        rows.append(
            {"recipe": name, "direct_s": direct, "copy_in_s": copy_in, "identical": same, "runs": times}
        )
        print(f"{name:16s} direct {direct:.3f} s  copy-in {copy_in:.3f} s  ({copy_in / direct:.2f}x)"
              f"  identical: {same}", flush=True)  # fmt: skip

    meta = {
        "parameters": params,
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "cpus": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": date.today().isoformat(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Merging into a resident model: straight into its parameters vs copied in",
        "",
        f"A bf16 Llama-shaped model of {params / 1e6:.0f}M parameters (hidden {args.hidden}, "
        f"{args.layers} layers, vocabulary {args.vocab}) held in memory, merged into from three",
        "checkpoints of the same shape (page cache warm), in process, as a search worker does.",
        '"direct": the engine writes each block of an elementwise result into the parameter;',
        '"copy-in": the same merge into a fresh tensor, then `param.copy_`. Seconds, median of',
        f'{args.repeat} runs per mode, the modes alternating. "identical": the parameters after a',
        "copy-in run and after a direct run are equal bit for bit.",
        "",
        "| recipe | direct s | copy-in s | copy-in / direct | identical |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['direct_s']:.3f} | {r['copy_in_s']:.3f} | "
            f"{r['copy_in_s'] / r['direct_s']:.2f}x | {'yes' if r['identical'] else 'NO'} |"
        )
    lines += [
        "",
        f"torch {meta['torch']}, {meta['machine']} with {meta['cpus']} CPU threads.",
        f"Produced by `python benchmarks/resident_merge.py` on {meta['date']}.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
