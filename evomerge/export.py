"""Export the best trials of a run: recipe, merged checkpoint, model card, report plot.

Nothing is re-derived that the ledger has: the recipe is the decoded genome of the recorded
trial, the fitness is the recorded value. The held-out tasks (the config's ``heldout``) are
scored here, for the parents too, on data the search never saw.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import torch

from evomerge.config import SearchConfig
from evomerge.ledger import Ledger
from evomerge.recipe import StagedRecipe
from evomerge.search import load_space


def export(run_dir: Path, top: int = 1, out: Path | None = None, log=print) -> list[Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Fitness, FitnessSpec
    from evomerge.merge import merge, merge_into_model
    from evomerge.recipe import MergeRecipe

    run_dir = Path(run_dir)
    config = SearchConfig.load(run_dir / "config.yaml", {"output": str(run_dir.resolve())})
    space = load_space(config)
    ledger = Ledger(run_dir, space, storage=config.storage)
    done = sorted((t for t in ledger.trials() if t.state.name == "COMPLETE"), key=lambda t: -t.values[0])
    out = Path(out) if out else run_dir / "best"
    out.mkdir(parents=True, exist_ok=True)
    heldout = {}
    if config.heldout:
        model = AutoModelForCausalLM.from_pretrained(config.models.base, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(config.models.base)
        scorer = Fitness(
            model, tokenizer, FitnessSpec(tasks=config.heldout, task_dirs=config.fitness.task_dirs)
        )
        for name, path in config.models.experts.items():
            merge_into_model(
                MergeRecipe.parse({"merge_method": "passthrough", "models": [{"model": str(path)}]}), model
            )
            heldout[f"expert {name}"] = _values(scorer(), config)
    written = []
    seen = set()
    for trial in done:
        if len(written) == top:
            break
        recipe = space.decode(trial.params, seed=config.optimizer.seed)
        if recipe.digest() in seen:
            continue
        seen.add(recipe.digest())
        rank = len(written) + 1
        target = out if top == 1 else out / f"rank{rank}"
        target.mkdir(parents=True, exist_ok=True)
        recipe.save(target / "recipe.yaml")
        log(f"merging trial {trial.number} (fitness {trial.values[0]:.4f}) into {target / 'model'}")
        merge(recipe, target / "model", overwrite=True)
        scores = dict(heldout)
        if config.heldout:
            merge_into_model(recipe, model)
            scores[f"merge (trial {trial.number})"] = _values(scorer(), config)
        _model_card(target, config, trial, recipe, scores, len(ledger.trials()))
        written.append(target)
    _report(run_dir, ledger, space, done[0] if done else None)
    return written


def _values(result, config) -> dict[str, float]:
    return {t.label: result.metrics[t.label][t.metric_key] for t in config.heldout}


def _method_text(recipe) -> str:
    if not isinstance(recipe, StagedRecipe):
        return f"`{recipe.merge_method}`"
    parts = []
    for sl in recipe.final.slices or []:
        src = sl.sources[0]
        stage = recipe.stages.get(src.model)
        method = stage.merge_method if stage else src.model
        parts.append(f"layers {src.layer_range[0]}-{src.layer_range[1] - 1}: `{method}`")
    return "a method per layer group (" + "; ".join(parts) + ")"


def _model_card(target: Path, config, trial, recipe, scores, n_trials: int) -> None:
    lines = [
        "---",
        "tags: [merge, evomerge]",
        "---",
        f"# Merge found by evomerge (trial {trial.number} of {n_trials})",
        "",
        f"Base: `{config.models.base}`. Experts: "
        + ", ".join(f"`{n}` ({p})" for n, p in config.models.experts.items())
        + ".",
        f"Method: {_method_text(recipe)}; found by `{config.optimizer.name}` (seed {config.optimizer.seed}) "
        f"on {date.today()}; fitness (search split) {trial.values[0]:.4f}.",
        "",
        "Per-task fitness metrics: `" + json.dumps(json.loads(trial.user_attrs.get("metrics", "{}"))) + "`",
        "",
    ]
    if scores:
        tasks = list(next(iter(scores.values())))
        header = "| model | " + " | ".join(tasks) + " |"
        lines += ["## Held-out scores (never seen by the search)", "", header, "|---|" + "---:|" * len(tasks)]
        lines += [
            f"| {name} | " + " | ".join(f"{v[t]:.4f}" for t in tasks) + " |" for name, v in scores.items()
        ]
        lines.append("")
    runs_with = "`mergekit-multi`" if isinstance(recipe, StagedRecipe) else "`mergekit-yaml`"
    lines += [
        f"## Recipe (runs in {runs_with} as it is)",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    (target / "README.md").write_text("\n".join(lines))


def _report(run_dir: Path, ledger, space, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = ledger.trials()
    values = [t.values[0] if t.state.name == "COMPLETE" else float("nan") for t in trials]
    running, best_so_far = [], float("-inf")
    for v in values:
        if v == v:
            best_so_far = max(best_so_far, v)
        running.append(best_so_far)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    axes[0].plot(values, ".", alpha=0.4, label="trial")
    axes[0].plot(running, "-", label="best so far")
    axes[0].set_xlabel("evaluation")
    axes[0].set_ylabel("fitness")
    axes[0].legend()
    if best is not None:
        numeric = [g for g in space.genes if not g.categorical and g.group is not None]
        rows = sorted({(g.param, g.model, g.block) for g in numeric}, key=str)
        groups = ["embed", *space.groups, "head"]
        grid = [[float("nan")] * len(groups) for _ in rows]
        for g in numeric:
            r = rows.index((g.param, g.model, g.block))
            grid[r][groups.index(g.group)] = space.spec.parameters[g.param].decode(best.params[g.name])
        image = axes[1].imshow(grid, aspect="auto", cmap="viridis")
        axes[1].set_yticks(range(len(rows)), [".".join(x for x in row if x) for row in rows], fontsize=7)
        axes[1].set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
        axes[1].set_title(f"best genome (trial {best.number})")
        fig.colorbar(image, ax=axes[1])
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=110)
    plt.close(fig)
