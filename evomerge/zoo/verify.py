"""Checks that a zoo is what it claims to be, on its actual weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import EvomergeError
from evomerge.zoo import Zoo
from evomerge.zoo.score import accuracy
from evomerge.zoo.tasks import HELDOUT, read_split

# The property that makes the zoo useful: an expert of the "mergeable" set is good at its
# own skill and poor at the other expert's.
OWN_SKILL_AT_LEAST = 0.8
OTHER_SKILL_AT_MOST = 0.3


def verify_zoo(zoo: Zoo) -> list[str]:
    """Load every model with plain transformers, re-score it, and compare with the manifest.

    Returns one line per check passed; raises :class:`EvomergeError` at the first failure.
    """
    lines = []
    heldout = {s: read_split(zoo.tasks, s, HELDOUT) for s in zoo.skills}
    scores: dict[str, dict[str, float]] = {}
    for name in zoo.model_names:
        path = zoo.model(name)
        reader = CheckpointReader(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if sorted(reader.names) != sorted(model.state_dict()):
            raise EvomergeError(f"{path}: tensors on disk differ from the model's parameters")
        scores[name] = {s: accuracy(model, tokenizer, heldout[s]) for s in zoo.skills}
        recorded = zoo.manifest["models"][name]["heldout_accuracy"]
        if scores[name] != recorded:
            raise EvomergeError(
                f"{path}: held-out accuracy {scores[name]} differs from zoo.json's {recorded}"
            )
    lines.append(f"{len(scores)} models load with transformers and re-score exactly as recorded")
    if zoo.manifest.get("quick"):
        return lines  # a quick zoo is too small to have learned anything
    experts = zoo.expert_set("mergeable")
    for name in experts:
        own = zoo.manifest["models"][name]["skill"]
        for other_expert in experts:
            other = zoo.manifest["models"][other_expert]["skill"]
            if other == own:
                continue
            if scores[name][own] < OWN_SKILL_AT_LEAST or scores[name][other] > OTHER_SKILL_AT_MOST:
                raise EvomergeError(
                    f"{zoo.root}: expert {name} scores {scores[name][own]:.2f} on its skill {own} "
                    f"(needs >= {OWN_SKILL_AT_LEAST}) and {scores[name][other]:.2f} on {other} "
                    f"(needs <= {OTHER_SKILL_AT_MOST})"
                )
            lines.append(f"expert {name}: {own} {scores[name][own]:.2f}, {other} {scores[name][other]:.2f}")
    return lines
