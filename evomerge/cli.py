"""The ``evomerge`` command. Thin: parse arguments, call the package, print.

User mistakes (:class:`~evomerge.errors.EvomergeError`) are printed as one line on stderr
with exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from evomerge import __version__
from evomerge.errors import EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Search for the best way to merge fine-tuned language models.\n\n"
    "Ray workers merge and evaluate candidates proposed by CMA-ES or an Optuna sampler over "
    "per-layer merge coefficients; the best are exported as mergekit-compatible recipes and "
    "safetensors checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(
    help="The toy model zoo: a tiny Llama base and experts on synthetic skills (offline, CPU).",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")
out = Console(soft_wrap=True)  # long paths stay on one line (and greppable)
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"evomerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@zoo_app.command("path")
def zoo_path() -> None:
    """Print the directory of the prebuilt zoo shipped with evomerge."""
    from evomerge.zoo import load_zoo

    print(load_zoo().root)


@zoo_app.command("build")
def zoo_build(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (must not exist).")],
    quick: Annotated[
        bool, typer.Option("--quick", help="A tiny, few-step zoo for tests (seconds, not minutes).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of data, initialisation and training.")] = 0,
) -> None:
    """Rebuild the zoo from seeds: tasks, base model and experts (about 11 minutes on 2 CPUs).

    The result is bit-for-bit the same for the same seed on the same machine type.
    """
    from evomerge.zoo.build import build_zoo

    manifest = build_zoo(out_dir, quick=quick, seed=seed, log=err.print)
    out.print(
        f"built zoo in {out_dir} ({manifest['parameters']:,} parameters per model, "
        f"{manifest['build_seconds']:.0f}s)"
    )


@zoo_app.command("table")
def zoo_table_cmd(
    zoo_dir: Annotated[Path | None, typer.Option("--zoo", help="Zoo directory (default: prebuilt).")] = None,
    random_layerwise: Annotated[
        int, typer.Option("--random", help="Random per-layer merges to try on the hard set.")
    ] = 32,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the table here.")] = None,
) -> None:
    """Score every zoo model and a few merges on each skill's held-out split."""
    from evomerge.zoo import load_zoo

    _print_zoo_table(load_zoo(zoo_dir), random_layerwise, markdown)


def _print_zoo_table(zoo, random_layerwise: int, markdown: Path | None) -> None:
    from evomerge.zoo.table import format_table, mean_of, zoo_table

    rows = zoo_table(zoo, random_layerwise=random_layerwise, log=err.print)
    pair = [zoo.manifest["models"][e]["skill"] for e in zoo.expert_set("mergeable")]
    table = Table(
        title=f"toy zoo (synthetic), held-out accuracy; mean = mean of {' and '.join(pair)}",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("model / merge", no_wrap=True)
    for col in [*zoo.skills, "mean"]:
        table.add_column(col, justify="right", no_wrap=True, min_width=5)
    for r in rows:
        table.add_row(r.label, *(f"{r.scores[s]:.3f}" for s in zoo.skills), f"{mean_of(r.scores, pair):.3f}")
    out.print(table)
    for r in rows:
        if r.note and "held-out" in r.note:
            out.print(f"{r.label}: {r.note}", soft_wrap=True)
    if markdown:
        markdown.write_text(format_table(rows, zoo.skills, pair) + "\n")
        err.print(f"wrote {markdown}")


def _parse_size(text: str) -> int:
    """'5GB', '500MB', '2e9' -> bytes (decimal units, as Hugging Face uses)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMG]?)B?\s*", text.upper())
    try:
        value = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
    except (AttributeError, ValueError):
        raise EvomergeError(f"--shard-size: cannot read {text!r}; write e.g. 5GB or 500MB") from None
    return int(value)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="A merge recipe (mergekit-compatible YAML).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the merged checkpoint to.")],
    device: Annotated[str, typer.Option(help="Where the merge math runs: cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(help="Saved dtype (overrides the recipe's out_dtype): float32, bfloat16, ..."),
    ] = None,
    shard_size: Annotated[str, typer.Option(help="Largest shard file, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Merge models as a recipe says and write a Hugging Face checkpoint.

    The output loads with transformers' AutoModelForCausalLM and AutoTokenizer. It is written
    to a temporary directory and renamed into place, so OUT_DIR is complete or absent.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.merge import merge as run_merge
    from evomerge.recipe import MergeRecipe

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available here")
    parsed = MergeRecipe.load(recipe)
    if dtype is not None:
        parsed = MergeRecipe.parse({**parsed.to_dict(), "out_dtype": dtype}, where="--dtype")
    columns = [TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("merge", total=None)
        run_merge(
            parsed,
            out_dir,
            device=device,
            relative_to=recipe.resolve().parent,
            max_shard_bytes=_parse_size(shard_size),
            overwrite=overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    out.print(f"wrote {out_dir}")


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face checkpoint directory (safetensors).")],
    task: Annotated[
        list[str],
        typer.Option("--task", help="NAME[:METRIC[:WEIGHT]]; metric as lm-eval names it (acc = acc,none)."),
    ],
    task_dir: Annotated[
        list[Path], typer.Option("--task-dir", help="A directory of lm-eval task YAML.")
    ] = [],  # noqa: B006
    limit: Annotated[int | None, typer.Option(help="Examples per task (a fixed, seeded subset).")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Score a checkpoint on lm-eval tasks: per-task metrics and the weighted aggregate.

    Task YAML paths in --task-dir resolve relative data_files against the YAML's own folder.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoint import CheckpointReader
    from evomerge.fitness import Fitness, FitnessSpec
    from evomerge.fitness.lm_eval_tasks import task_specs_from_cli

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available here")
    CheckpointReader(model_dir)  # refuses pickles and non-checkpoints with a clear message
    spec = FitnessSpec(
        tasks=task_specs_from_cli(task), task_dirs=task_dir, limit=limit, batch_size=batch_size
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    result = Fitness(model, tokenizer, spec)()
    if result.error:
        raise EvomergeError(result.error)
    if as_json:
        payload = {"model": str(model_dir), "metrics": result.metrics, "aggregate": result.objectives[0]}
        print(json.dumps(payload, indent=2))
        return
    table = Table(title=f"{model_dir}", box=box.SIMPLE_HEAD)
    for col in ["task", "metric", "value", "weight"]:
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for t in spec.tasks:
        table.add_row(t.label, t.metric_key, f"{result.metrics[t.label][t.metric_key]:.4f}", f"{t.weight:g}")
    out.print(table)
    out.print(f"weighted aggregate: {result.objectives[0]:.4f}  ({result.seconds:.2f} s)")


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A Hugging Face safetensors checkpoint directory.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Show a checkpoint's tensors by layer and block, without loading them."""
    from evomerge.checkpoint import CheckpointReader, locate

    ckpt = CheckpointReader(checkpoint)
    infos = [ckpt.info(n) for n in ckpt.names]
    blocks = Counter(locate(i.name).block.value for i in infos)
    out.print(
        f"{checkpoint}: {len(infos)} tensors, {sum(i.numel for i in infos):,} parameters, "
        f"{ckpt.num_layers} layers; " + ", ".join(f"{b} {n}" for b, n in sorted(blocks.items()))
    )
    if tensors:
        table = Table()
        for col in ["tensor", "shape", "dtype", "layer", "block"]:
            table.add_column(col)
        for i in infos:
            loc = locate(i.name)
            table.add_row(
                i.name,
                "x".join(map(str, i.shape)),
                str(i.dtype).removeprefix("torch."),
                "" if loc.layer is None else str(loc.layer),
                loc.block.value,
            )
        out.print(table)


@app.command()
def demo(
    zoo_dir: Annotated[Path | None, typer.Option("--zoo", help="Zoo directory (default: prebuilt).")] = None,
) -> None:
    """Verify the toy zoo and print its score table (the search demo comes with the search)."""
    from evomerge.zoo import load_zoo
    from evomerge.zoo.verify import verify_zoo

    zoo = load_zoo(zoo_dir)
    err.print(f"verifying the zoo in {zoo.root}")
    for line in verify_zoo(zoo):
        err.print(f"  ok  {line}")
    _print_zoo_table(zoo, random_layerwise=8, markdown=None)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except EvomergeError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
