"""Merge speed: evomerge against mergekit-yaml on the same recipes and checkpoints, in one run.

Synthetic Llama-shaped bf16 checkpoints (a base and two "experts" = base + noise) of a few
hundred million parameters, so merge time dominates start-up. Each merge runs as its own
process (the CLI a user runs), timed wall-clock, with its peak resident memory from the
kernel (wait4). The floor is a plain copy of the same bytes in the same run: copy every
input tensor into memory, write one output checkpoint. Before every timed run the page cache's
dirty pages are flushed (sync), so no run pays for the previous one's writeback; each run is
repeated and the median reported. Writes benchmarks/results/merge_speed.{md,json}.

    .venv/bin/python benchmarks/merge_speed.py              # ~950M parameters per model (~15 min)
    .venv/bin/python benchmarks/merge_speed.py --layers 4 --repeat 1   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).parent / "results"
COPY_SCRIPT = """
import sys
from evomerge.allocator import keep_freed_memory
from evomerge.checkpoint import CheckpointReader, CheckpointWriter
keep_freed_memory()  # the same allocator setting as the evomerge command: a fair floor
out, *inputs = sys.argv[1:]
readers = [CheckpointReader(p) for p in inputs]
first = readers[0]
layout = [(n, first.info(n).shape, first.info(n).dtype) for n in first.names]
with CheckpointWriter(out, metadata_from=inputs[0], layout=layout) as w:
    for n in first.names:
        tensors = [r.get(n).clone() for r in readers]  # every input byte copied into memory once
        w.add(n, tensors[0])
"""


def make_models(root: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> dict[str, Path]:
    """base, expert_a, expert_b: Llama-shaped bf16 checkpoints (cached between runs)."""
    from transformers import LlamaConfig

    from evomerge.checkpoint import CheckpointWriter
    from evomerge.zoo import load_zoo

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    inter = config.intermediate_size
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    tag = f"llama-h{hidden}-l{layers}-v{vocab}"
    paths = {name: root / tag / name for name in ["base", "expert_a", "expert_b"]}
    if all(
        (p / "model.safetensors.index.json").exists() or (p / "model.safetensors").exists()
        for p in paths.values()
    ):
        return paths
    tok = load_zoo().model("base")
    layout = [(n, s, torch.bfloat16) for n, s in shapes.items()]
    for k, (name, path) in enumerate(paths.items()):
        if path.exists():
            shutil.rmtree(path)
        g = torch.Generator().manual_seed(seed)  # every model starts from the same base draw
        noise = torch.Generator().manual_seed(seed + 100 + k)
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path.parent / f".cfg-{name}")
        with CheckpointWriter(path, metadata_from=path.parent / f".cfg-{name}", tokenizer_from=tok,
                              layout=layout, max_shard_bytes=2 * 1024**3) as w:  # fmt: skip
            for n, s in shapes.items():
                t = torch.randn(s, generator=g) * 0.02
                if k:
                    t += torch.randn(s, generator=noise) * 0.002
                w.add(n, t.to(torch.bfloat16))
        shutil.rmtree(path.parent / f".cfg-{name}")
        print(f"  wrote {path} ({params / 1e6:.0f}M parameters)", flush=True)
    return paths


def recipes(m: dict[str, Path]) -> dict[str, dict]:
    base, a, b = str(m["base"]), str(m["expert_a"]), str(m["expert_b"])
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                        {"model": b, "parameters": {"weight": 0.5}}],
                   "dtype": "bfloat16"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": [{"model": a, "parameters": {"weight": 0.7}},
                                       {"model": b, "parameters": {"weight": 0.5}}], "dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                            {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}], "dtype": "bfloat16"},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base,
                      "models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                                 {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}], "dtype": "bfloat16"},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.4}, "dtype": "bfloat16"},
    }  # fmt: skip


# Peak RSS comes from wait4 in a minimal launcher (python -S, ~10 MB): the kernel carries a
# process's peak over exec, so a child forked straight from this (larger) process would report
# at least this process's own peak.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, started with no dirty pages."""
    os.sync()
    with tempfile.TemporaryDirectory() as tmp:
        peak, log = Path(tmp) / "peak", Path(tmp) / "stderr"
        start = time.perf_counter()
        with open(log, "wb") as err:
            launch = [sys.executable, "-S", "-c", LAUNCHER, str(peak), *cmd]
            code = subprocess.call(launch, env=env, stdout=subprocess.DEVNULL, stderr=err)
        wall = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
        return wall, int(peak.read_text()) / 1024


CHECKED = (
    "model.embed_tokens.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
)


def exactness(recipe: dict, out: Path) -> float | None:
    """Fraction of entries of a few output tensors equal to the correctly rounded result (the
    method computed in float64 from the same inputs, rounded once to bf16); None for DARE,
    whose random masks differ between the tools."""
    from evomerge.checkpoint import CheckpointReader
    from evomerge.methods import merge_tensors

    method = recipe["merge_method"]
    if method.startswith("dare"):
        return None
    base = recipe.get("base_model")
    entries = [m for m in recipe["models"] if m["model"] != base or method == "linear"]
    params = dict(recipe.get("parameters", {}))
    for key in entries[0].get("parameters", {}):
        params[key] = [m["parameters"][key] for m in entries]
    readers = {m: CheckpointReader(m) for m in {base, *(m["model"] for m in entries)} if m}
    merged = CheckpointReader(out)
    equal = total = 0
    for name in CHECKED:
        xs = [readers[m["model"]].get(name).double() for m in entries]
        reference = merge_tensors(method, xs, readers[base].get(name).double() if base else None, **params)
        equal += int(torch.count_nonzero(merged.get(name) == reference.to(torch.bfloat16)))
        total += reference.numel()
    return equal / total


def _percent(fraction: float | None) -> str:
    return "n/a (random)" if fraction is None else f"{100 * fraction:.2f}%"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--only", nargs="*", help="recipes to run (default: all)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each tool per recipe (median reported)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "merge_speed")
    args = parser.parse_args()

    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("preparing checkpoints", flush=True)
    models = make_models(args.work / "models", args.hidden, args.layers, args.vocab)
    size = dir_bytes(models["base"])
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)

    rows = []
    todo = {k: v for k, v in recipes(models).items() if not args.only or k in args.only}
    for name, recipe in todo.items():
        path = runs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        inputs = [Path(m["model"]) for m in recipe["models"]] + (
            [Path(recipe["base_model"])] if "base_model" in recipe else []
        )
        inputs = list(dict.fromkeys(inputs))
        moved = size * (len(inputs) + 1)  # every input read once, one output written
        commands = {
            "copy": [sys.executable, "-c", COPY_SCRIPT, str(runs / f"{name}-copy"), *map(str, inputs)],
            "mergekit": [str(venv_bin / "mergekit-yaml"), str(path), str(runs / f"{name}-mergekit"),
                         "--no-copy-tokenizer", "--no-write-model-card"],
            "evomerge": [str(venv_bin / "evomerge"), "merge", str(path), str(runs / f"{name}-evomerge")],
        }  # fmt: skip
        walls: dict[str, list[float]] = {tool: [] for tool in commands}
        rss: dict[str, list[float]] = {tool: [] for tool in commands}
        for rep in range(args.repeat):
            for tool, cmd in commands.items():  # the copy floor first: the page cache is warm after it
                wall, peak = timed(cmd, env)
                walls[tool].append(wall)
                rss[tool].append(peak)
                if tool == "copy" or rep < args.repeat - 1:  # the last merges are checked below
                    shutil.rmtree(runs / f"{name}-{tool}", ignore_errors=True)
                print(
                    f"  {name:<16} {tool:<9} run {rep + 1}/{args.repeat} {wall:7.1f} s {peak:8.0f} MiB",
                    flush=True,
                )
        accuracy = {tool: exactness(recipe, runs / f"{name}-{tool}") for tool in ("mergekit", "evomerge")}
        for tool in ("mergekit", "evomerge"):
            shutil.rmtree(runs / f"{name}-{tool}", ignore_errors=True)
        med = {tool: statistics.median(w) for tool, w in walls.items()}
        ratios = [m / e for m, e in zip(walls["mergekit"], walls["evomerge"], strict=True)]
        rows.append({
            "recipe": name, "inputs": len(inputs), "bytes_moved": moved,
            "copy_s": med["copy"], "mergekit_s": med["mergekit"], "evomerge_s": med["evomerge"],
            "copy_rss_mib": max(rss["copy"]), "mergekit_rss_mib": max(rss["mergekit"]),
            "evomerge_rss_mib": max(rss["evomerge"]),
            "speedup": med["mergekit"] / med["evomerge"], "speedup_min": min(ratios), "speedup_max": max(ratios),
            "evomerge_vs_copy": med["evomerge"] / med["copy"], "runs_s": walls,
            "mergekit_exact": accuracy["mergekit"], "evomerge_exact": accuracy["evomerge"],
        })  # fmt: skip

    header = (
        "| recipe | mergekit-yaml s | evomerge s | speedup | speedup per run | mergekit peak MiB | "
        "evomerge peak MiB | copy floor s | evomerge / copy | evomerge GB/s | copy GB/s | "
        "mergekit exact | evomerge exact |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['recipe']} | {r['mergekit_s']:.1f} | {r['evomerge_s']:.1f} | {r['speedup']:.2f}x | "
        f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x | "
        f"{r['mergekit_rss_mib']:.0f} | {r['evomerge_rss_mib']:.0f} | {r['copy_s']:.1f} | "
        f"{r['evomerge_vs_copy']:.2f}x | {r['bytes_moved'] / r['evomerge_s'] / 1e9:.2f} | "
        f"{r['bytes_moved'] / r['copy_s'] / 1e9:.2f} | {_percent(r['mergekit_exact'])} | "
        f"{_percent(r['evomerge_exact'])} |"
        for r in rows
    ]
    table = "\n".join([header, *lines])
    text = f"""# Merge speed: evomerge vs mergekit-yaml

Synthetic Llama-shaped bf16 checkpoints: hidden {args.hidden}, {args.layers} layers, vocabulary
{args.vocab}, {size / 1e9:.2f} GB per model. Every run is a fresh process (start-up included),
wall-clock seconds, median of {args.repeat} runs per tool, each started after `sync` (no dirty pages
left by the run before); "speedup per run" is the range of mergekit / evomerge within each
repetition. Peak RSS from wait4 (the largest of the runs). "exact": the share of entries of
three tensors (the embedding, layer 0's down and q projections) equal to the correctly rounded
result, that is the method computed in float64 from the same inputs and rounded once to bf16. "copy floor": a process that copies
every input tensor into memory and writes one output checkpoint, the bytes a merge must move.
GB/s = (inputs + output) bytes / wall.

{table}

mergekit {_version("mergekit")}, evomerge {_version("evomerge")}, torch {torch.__version__},
{platform.machine()} with {os.cpu_count()} CPUs, page cache warm (the copy floor runs first).
evomerge and the copy floor keep freed memory in the heap (`evomerge/allocator.py`) and write
shards with O_DIRECT (`evomerge/checkpoint/writer.py`); mergekit runs as installed.
Produced by `python benchmarks/merge_speed.py` on {date.today()}.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(table)
    print(f"wrote {args.out.with_suffix('.md')}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
