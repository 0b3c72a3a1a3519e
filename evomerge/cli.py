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
from rich.markup import escape
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
# long paths stay on one line (and greppable); text is printed as it is: no markup or emoji codes
# (a message naming "models[/abs/path]" or "cuda:x:" would be rewritten)
out = Console(soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


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
    direct_io: Annotated[
        bool,
        typer.Option(
            help="Write shards with O_DIRECT where the filesystem supports it (the output does not "
            "fill the page cache); --no-direct-io writes through the page cache, which can finish "
            "sooner for a small model on a slow disk."
        ),
    ] = True,
) -> None:
    """Merge models as a recipe says and write a Hugging Face checkpoint.

    The output loads with transformers' AutoModelForCausalLM and AutoTokenizer. It is written
    to a temporary directory and renamed into place, so OUT_DIR is complete or absent.
    """
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.merge import merge as run_merge
    from evomerge.recipe import MergeRecipe, StagedRecipe, load_recipe

    _check_device(device)
    parsed = load_recipe(recipe)
    if dtype is not None:
        top = parsed.final if isinstance(parsed, StagedRecipe) else parsed
        top = MergeRecipe.parse({**top.to_dict(), "out_dtype": dtype}, where="--dtype")
        parsed = dataclasses.replace(parsed, final=top) if isinstance(parsed, StagedRecipe) else top
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
            direct_io=direct_io,
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

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.checkpoint import CheckpointReader
    from evomerge.fitness import Fitness, FitnessSpec
    from evomerge.fitness.lm_eval_tasks import task_specs_from_cli

    _check_device(device)
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


@app.command("search")
def search_cmd(
    config: Annotated[Path, typer.Argument(help="A search config YAML (see examples/zoo-search.yaml).")],
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (overrides `output`).")] = None,
    max_evals: Annotated[int | None, typer.Option(help="Evaluations to run in all.")] = None,
    time_limit: Annotated[str | None, typer.Option(help="Stop after this long, e.g. 8h or 30m.")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="cma, tpe, optuna-cmaes, nsga2, gp, random, qmc.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Optimizer seed.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (0: evaluate in this process, no Ray).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster (e.g. 10.0.0.5:6379) instead of a local Ray.")
    ] = None,
) -> None:
    """Search for the best merge; every evaluation goes to RUN_DIR/study.db, the best recipe
    to RUN_DIR/best/recipe.yaml. Interrupt it any time and `evomerge resume RUN_DIR`."""
    from evomerge.config import SearchConfig

    overrides = {"output": str(run_dir.resolve())} if run_dir else {}
    for key, value in [("budget.max_evals", max_evals), ("budget.time_limit", time_limit),
                       ("optimizer.name", optimizer), ("optimizer.seed", seed),
                       ("workers.count", workers), ("workers.ray_address", ray_address)]:  # fmt: skip
        if value is not None:
            overrides[key] = value
    _run_search(SearchConfig.load(config, overrides), resume=False)


@app.command("resume")
def resume_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The run directory of an interrupted search.")],
    max_evals: Annotated[int | None, typer.Option(help="Raise the evaluation budget.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers this time (0: in-process).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster this time.")] = None,
) -> None:
    """Continue a search where it stopped: the optimizer is replayed from the run's journal
    and candidates that were in flight are evaluated again."""
    from evomerge.config import SearchConfig

    path = run_dir / "config.yaml"
    if not path.exists():
        raise EvomergeError(f"{run_dir}: not a run directory (no config.yaml)")
    overrides = {"output": str(run_dir.resolve())}
    for key, value in [("budget.max_evals", max_evals), ("workers.count", workers),
                       ("workers.ray_address", ray_address)]:  # fmt: skip
        if value is not None:
            overrides[key] = value
    _run_search(SearchConfig.load(path, overrides), resume=True)


def _run_search(config, resume: bool):
    import signal

    from evomerge.search import search

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        summary = search(config, resume=resume, log=lambda line: err.print(line, highlight=False))
    except KeyboardInterrupt:
        err.print(f"stopped; state is saved. Continue with: evomerge resume {config.output}")
        raise typer.Exit(130) from None
    best = "-" if summary.best_value is None else f"{summary.best_value:.4f}"
    out.print(f"{summary.trials} trials ({summary.failures} failed) in {summary.seconds:.0f} s; best {best}; "
              f"best recipe: {summary.best_recipe}")  # fmt: skip
    if config.workers.count:
        err.print(f"workers were busy merging and scoring {summary.busy_fraction:.0%} of the time")
    return summary


@app.command("status")
def status_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Progress of a search: trials, failures, the best so far with its per-task metrics."""
    import json

    from evomerge.config import SearchConfig
    from evomerge.ledger import Ledger

    if not (run_dir / "config.yaml").exists():
        raise EvomergeError(f"{run_dir}: not a run directory (no config.yaml)")
    config = SearchConfig.load(run_dir / "config.yaml", {"output": str(run_dir.resolve())})
    ledger = Ledger(run_dir, storage=config.storage)
    trials = ledger.trials()
    best = ledger.best()
    payload = {
        "run_dir": str(run_dir),
        "trials": len(trials),
        "failed": sum(t.state.name == "FAIL" for t in trials),
        "best": None
        if best is None
        else {
            "trial": best.number,
            "value": best.values[0],
            "metrics": json.loads(best.user_attrs.get("metrics", "{}")),
        },
    }
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    out.print(f"{run_dir}: {payload['trials']} trials, {payload['failed']} failed")
    if best is not None:
        out.print(
            f"best: trial {best.number}, value {best.values[0]:.4f}, metrics {payload['best']['metrics']}"
        )


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    top: Annotated[int, typer.Option(help="How many of the best distinct trials to export.")] = 1,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where (default: RUN_DIR/best).")] = None,
) -> None:
    """Write the best trials as recipe + merged checkpoint + model card (held-out scores of the
    merge and its parents), and RUN_DIR/report.png."""
    from evomerge.export import export

    if not (run_dir / "config.yaml").exists():
        raise EvomergeError(f"{run_dir}: not a run directory (no config.yaml)")
    for path in export(run_dir, top=top, out=out_dir, log=lambda line: err.print(line, highlight=False)):
        out.print(f"exported {path}")
    out.print(f"report: {run_dir / 'report.png'}")


@app.command()
def demo(
    run_dir: Annotated[Path, typer.Option(help="Where the demo search writes.")] = Path("runs/demo"),
    max_evals: Annotated[int, typer.Option(help="Evaluations.")] = 300,
) -> None:
    """The main job on the toy zoo: verify the zoo, search per-layer task-arithmetic
    coefficients for its two experts (addition, reversal) on 2 Ray workers
    (examples/zoo-search.yaml), and compare the best merge with the parents and the untuned
    merge on held-out data (about 1.5 minutes on 2 CPUs)."""
    import shutil

    from evomerge.config import SearchConfig
    from evomerge.zoo import load_zoo
    from evomerge.zoo.verify import verify_zoo

    zoo = load_zoo()
    err.print(f"verifying the zoo in {zoo.root}")
    for line in verify_zoo(zoo):
        err.print(f"  ok  {line}")
    example = Path(__file__).resolve().parent.parent / "examples" / "zoo-search.yaml"
    if not example.exists():
        raise EvomergeError(f"{example}: the demo config is missing")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = SearchConfig.load(example, {"output": str(run_dir.resolve()), "budget.max_evals": max_evals})
    summary = _run_search(config, resume=False)
    _demo_table(config, summary)


def _demo_table(config, summary) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Fitness, FitnessSpec
    from evomerge.merge import merge_into_model
    from evomerge.recipe import MergeRecipe, load_recipe

    base = config.models.base
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    spec = FitnessSpec(tasks=config.heldout, task_dirs=config.fitness.task_dirs, batch_size=256)
    fitness = Fitness(model, tokenizer, spec)
    untuned = MergeRecipe.parse({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in config.models.experts.values()],
    })  # fmt: skip
    rows = []
    for name, path in config.models.experts.items():
        merge_into_model(
            MergeRecipe.parse({"merge_method": "passthrough", "models": [{"model": str(path)}]}), model
        )
        rows.append((f"expert {name}", fitness()))
    merge_into_model(untuned, model)
    rows.append(("untuned task arithmetic (all weights 1)", fitness()))
    merge_into_model(load_recipe(summary.best_recipe), model)
    rows.append((f"best of {summary.trials} searched merges", fitness()))
    table = Table(title="held-out accuracy (the search never saw these examples)", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    for t in spec.tasks:
        table.add_column(t.name.removeprefix("zoo_").removesuffix("_heldout"), justify="right")
    table.add_column("mean", justify="right")
    for label, result in rows:
        values = [result.metrics[t.label][t.metric_key] for t in spec.tasks]
        table.add_row(label, *(f"{v:.3f}" for v in values), f"{sum(values) / len(values):.3f}")
    out.print(table)
    out.print(
        f"best recipe: {summary.best_recipe}  (evomerge merge {summary.best_recipe} OUT/ writes the model)"
    )


def _check_device(device: str) -> None:
    """A device this machine has, or one clear error."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvomergeError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise EvomergeError(f"--device {device}: not supported; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"--device {device}: no CUDA device is available here")


def main() -> None:
    from evomerge.allocator import keep_freed_memory

    keep_freed_memory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except EvomergeError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
