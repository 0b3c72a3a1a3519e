"""The zoo's score table: every model and a few uniform merges on each skill's held-out split.

This is the evidence that the zoo makes merging matter (``benchmarks/results/zoo.md``).
The merges are task arithmetic with per-layer-group weights, computed tensor by tensor with
the merge engine's own method.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import CheckpointReader, locate
from evomerge.methods import merge_tensors
from evomerge.zoo import Zoo
from evomerge.zoo.score import accuracy
from evomerge.zoo.tasks import FIT, HELDOUT, read_split

StateDict = dict[str, torch.Tensor]


def load_state(path) -> StateDict:
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.names}


def layer_group(name: str) -> int:
    """Decoder layer of a tensor; -1 for embeddings, final norm and head."""
    layer = locate(name).layer
    return -1 if layer is None else layer


def task_arithmetic(
    base: StateDict, experts: list[StateDict], weight: Callable[[int, int], float]
) -> StateDict:
    """base + sum_i weight(i, group) * (expert_i - base), per tensor."""
    out = {}
    for name, b in base.items():
        g = layer_group(name)
        weights = [weight(i, g) for i in range(len(experts))]
        out[name] = merge_tensors("task_arithmetic", [e[name] for e in experts], b, weight=weights)
    return out


@dataclass
class Row:
    label: str
    scores: dict[str, float]
    note: str = ""


class Scorer:
    """One resident model whose weights are swapped in for each state dict scored."""

    def __init__(self, zoo: Zoo):
        self.zoo = zoo
        self.tokenizer = AutoTokenizer.from_pretrained(zoo.model("base"))
        self.model = AutoModelForCausalLM.from_pretrained(zoo.model("base"), dtype=torch.float32).eval()
        self.splits = {
            (skill, split): read_split(zoo.tasks, skill, split)
            for skill in zoo.skills
            for split in (FIT, HELDOUT)
        }

    def score(self, state: StateDict, split: str = HELDOUT) -> dict[str, float]:
        self.model.load_state_dict(state)
        return {s: accuracy(self.model, self.tokenizer, self.splits[(s, split)]) for s in self.zoo.skills}


def mean_of(scores: dict[str, float], skills: list[str]) -> float:
    return sum(scores[s] for s in skills) / len(skills)


def zoo_table(zoo: Zoo, *, random_layerwise: int = 32, seed: int = 0, log=print) -> list[Row]:
    """Score the zoo's models and its uniform merges; see the module docstring."""
    scorer = Scorer(zoo)
    states = {name: load_state(zoo.model(name)) for name in zoo.model_names}
    rows = [Row(name, scorer.score(states[name])) for name in zoo.model_names]
    log(f"scored {len(rows)} models")

    for set_name in ("mergeable", "hard"):
        experts = [states[n] for n in zoo.expert_set(set_name)]
        for lam, what in [(0.5, "average of experts"), (1.0, "sum of task vectors")]:
            merged = task_arithmetic(states["base"], experts, lambda i, g, lam=lam: lam)
            rows.append(Row(f"{set_name}: task arithmetic x{lam}", scorer.score(merged), what))
    forgot = zoo.expert_set("forgetting")
    merged = task_arithmetic(states["base"], [states[n] for n in forgot], lambda i, g: 0.5)
    rows.append(Row(f"forgetting: {forgot[0]} x0.5", scorer.score(merged), "half-way back to the base"))

    if random_layerwise:
        rows += _random_layerwise(zoo, scorer, states, random_layerwise, seed, log)
    return rows


def _random_layerwise(zoo, scorer, states, n, seed, log) -> list[Row]:
    """Per-layer coefficients matter: random per-layer task arithmetic on the hard set.
    The best is chosen on the fitness split and reported on the held-out split."""
    rng = random.Random(seed)
    experts_names = zoo.expert_set("hard")
    experts = [states[e] for e in experts_names]
    skills = [zoo.manifest["models"][e]["skill"] for e in experts_names]
    groups = sorted({layer_group(name) for name in states["base"]})
    trials = []
    for _ in range(n):
        coef = {(i, g): rng.uniform(0.0, 1.5) for i in range(len(experts)) for g in groups}
        merged = task_arithmetic(states["base"], experts, lambda i, g, c=coef: c[(i, g)])
        fit, held = scorer.score(merged, FIT), scorer.score(merged, HELDOUT)
        trials.append((mean_of(fit, skills), mean_of(held, skills), held))
    log(f"scored {n} random per-layer merges")
    trials.sort(key=lambda t: t[0])
    best, worst = trials[-1], trials[0]
    helds = sorted(t[1] for t in trials)
    spread = (
        f"held-out mean over {n} draws: min {helds[0]:.3f}, median {helds[n // 2]:.3f}, max {helds[-1]:.3f}"
    )
    return [
        Row(
            f"hard: per-layer TA, best of {n}", best[2], spread + " (best and worst chosen on the fit split)"
        ),
        Row(
            f"hard: per-layer TA, worst of {n}",
            worst[2],
            f"random coefficients, {len(groups)} groups x 2 experts",
        ),
    ]


def format_table(rows: list[Row], skills: list[str], pair: list[str]) -> str:
    """A Markdown table with one column per skill and the mean of the two expert skills."""
    head = ["model / merge", *skills, f"mean({'+'.join(pair)})", "note"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(skills) + 1) + ["---"]) + "|",
    ]
    for r in rows:
        cells = [r.label, *(f"{r.scores[s]:.3f}" for s in skills), f"{mean_of(r.scores, pair):.3f}", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
