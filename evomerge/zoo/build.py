"""Build the toy zoo from seeds: a base model, experts fine-tuned from it, and their tasks.

Layout of a zoo directory::

    zoo.json            manifest: models, their roles and training, sets, skills, scores
    base/               a Hugging Face checkpoint (safetensors, config, tokenizer)
    add/ rev/           the "mergeable" experts: fine-tuned with 50% replay of the base mix
    add_short/ ...      the "hard" experts: snapshots of the same runs, trained ~half as long
    add_noreplay/       fine-tuned on its skill alone; it forgets what the base could do
    tasks/              lm-eval task directory (YAML + JSONL, fitness and held-out splits)

Why replay: experts fine-tuned on their skill alone drift so far from the base that no
merge of them beats either expert; with replay their task vectors compose, which is the
regime real fine-tunes of one base are in. The short-trained experts (the same runs stopped
at step 400, mid-schedule) give a zoo where no untuned merge beats the experts, so a
per-layer search has to earn its keep.

How the plan was chosen (held-out mean of the two skills for task arithmetic, lambda 1,
against ~0.50 for either expert; 2 CPUs, one run each): constant lr 1e-3/5e-4 -> 0.34;
constant 3e-4/2e-4 -> 0.46 (0.41 with 75% replay); cosine decay 1e-3/5e-4 -> 0.58
(1400 steps: 0.60); cosine decay 1e-3 for both -> 0.27. Decay to a low final lr is what
makes the task vectors compose here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.zoo.score import accuracy
from evomerge.zoo.skills import BASE_MIXTURE, EVALUATED_SKILLS, Example, make_splits, sample_mixture
from evomerge.zoo.tasks import FIT, HELDOUT, write_task_dir
from evomerge.zoo.tokenizer import build_tokenizer
from evomerge.zoo.train import FULL_SHAPE, QUICK_SHAPE, ModelShape, TrainSpec, new_model, train

ZOO_FORMAT = 1


@dataclass(frozen=True)
class ExpertPlan:
    name: str
    skill: str
    steps: int
    lr: float
    replay: bool
    snapshot: tuple[str, int] | None = None  # (name, step): also save the model at that step


@dataclass(frozen=True)
class ZooPlan:
    shape: ModelShape
    base_steps: int
    base_lr: float
    experts: tuple[ExpertPlan, ...]
    split_sizes: dict[str, int]
    sets: dict[str, list[str]]


FULL_PLAN = ZooPlan(
    shape=FULL_SHAPE,
    base_steps=2000,
    base_lr=1e-3,
    experts=(
        ExpertPlan("add", "add", 1000, 1e-3, replay=True, snapshot=("add_short", 400)),
        ExpertPlan("rev", "rev", 1000, 5e-4, replay=True, snapshot=("rev_short", 400)),
        ExpertPlan("add_noreplay", "add", 1000, 1e-3, replay=False),
    ),
    split_sizes={FIT: 256, HELDOUT: 200},
    sets={
        "mergeable": ["add", "rev"],
        "hard": ["add_short", "rev_short"],
        "forgetting": ["add_noreplay"],
    },
)

QUICK_PLAN = ZooPlan(
    shape=QUICK_SHAPE,
    base_steps=40,
    base_lr=3e-3,
    experts=(
        ExpertPlan("add", "add", 20, 3e-3, replay=True, snapshot=("add_short", 10)),
        ExpertPlan("rev", "rev", 20, 3e-3, replay=True, snapshot=("rev_short", 10)),
        ExpertPlan("add_noreplay", "add", 20, 3e-3, replay=False),
    ),
    split_sizes={FIT: 16, HELDOUT: 16},
    sets=FULL_PLAN.sets,
)


def _sampler(skill: str, replay: bool) -> Callable[[random.Random], Example]:
    def sample(rng: random.Random) -> Example:
        if replay and rng.random() < 0.5:
            return sample_mixture(rng, BASE_MIXTURE)
        return sample_mixture(rng, [skill])

    return sample


def build_zoo(out: Path, *, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Build a zoo into ``out`` (which must not exist) and return its manifest.

    Everything is written to a temporary sibling directory first and renamed into place, so
    an interrupted build never leaves a directory that looks like a zoo.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new directory")
    plan = QUICK_PLAN if quick else FULL_PLAN
    # Two threads and deterministic kernels: the same bits on every 2-core machine of a kind.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _build(tmp, plan, quick=quick, seed=seed, log=log)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return manifest


def _build(root: Path, plan: ZooPlan, *, quick: bool, seed: int, log) -> dict:
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    splits = {s: make_splits(s, plan.split_sizes, seed) for s in EVALUATED_SKILLS}
    exclude = {ex.prompt for by_split in splits.values() for exs in by_split.values() for ex in exs}
    write_task_dir(root / "tasks", splits)

    models: dict[str, dict] = {}

    def save(name: str, model, info: dict) -> None:
        path = root / name
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        scores = {s: accuracy(model, tokenizer, splits[s][HELDOUT]) for s in EVALUATED_SKILLS}
        models[name] = {**info, "heldout_accuracy": scores}
        log(f"  saved {name:<13} " + "  ".join(f"{s} {v:.2f}" for s, v in scores.items()))

    log(f"base: {plan.base_steps} steps on {', '.join(BASE_MIXTURE)}")
    base = new_model(tokenizer, plan.shape, seed)
    train(
        base,
        tokenizer,
        TrainSpec(
            plan.base_steps,
            plan.base_lr,
            lambda rng: sample_mixture(rng, BASE_MIXTURE),
            seed=seed,
            weight_decay=0.01,
        ),
        exclude=exclude,
        log=log,
    )
    save(
        "base",
        base,
        {"role": "base", "steps": plan.base_steps, "lr": plan.base_lr, "trained_on": BASE_MIXTURE},
    )
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    for i, ex in enumerate(plan.experts):
        mix = f"{ex.skill} + 50% base mixture" if ex.replay else f"{ex.skill} only"
        log(f"expert {ex.name}: {ex.steps} steps on {mix}")
        model = new_model(tokenizer, plan.shape, seed)
        model.load_state_dict(base_state)
        info = {"role": "expert", "skill": ex.skill, "lr": ex.lr, "replay": ex.replay}
        snapshots = {}
        if ex.snapshot:
            snap_name, snap_step = ex.snapshot
            snapshots[snap_step] = lambda m, n=snap_name, s=snap_step, i=info: save(n, m, {**i, "steps": s})
        train(
            model,
            tokenizer,
            TrainSpec(ex.steps, ex.lr, _sampler(ex.skill, ex.replay), seed=seed + 1 + i),
            exclude=exclude,
            snapshots=snapshots,
            log=log,
        )
        save(ex.name, model, {**info, "steps": ex.steps})

    manifest = {
        "format": ZOO_FORMAT,
        "synthetic": True,
        "quick": quick,
        "seed": seed,
        "shape": asdict(plan.shape),
        "parameters": sum(p.numel() for p in base.parameters()),
        "skills": EVALUATED_SKILLS,
        "sets": plan.sets,
        "models": dict(sorted(models.items(), key=lambda kv: kv[1]["role"] != "base")),
        "tasks": "tasks",
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
