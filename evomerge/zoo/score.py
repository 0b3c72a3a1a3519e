"""Exact-match scoring of zoo skills with one teacher-forced forward pass.

An answer counts as correct iff every token of ``answer + "\\n"`` is the argmax given the
prompt and the answer so far. That is exactly greedy decoding stopped at the newline, and
what lm-eval's loglikelihood requests report as ``is_greedy`` (the zoo's ``*_ll`` tasks),
at a fraction of the cost of generating.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.zoo.skills import Example


@torch.inference_mode()
def greedy_correct(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 256,
) -> list[bool]:
    device = next(model.parameters()).device
    out: list[bool] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [tokenizer.encode(e.prompt, add_special_tokens=False) for e in chunk]
        targets = [tokenizer.encode(e.answer + "\n", add_special_tokens=False) for e in chunk]
        width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            ids[row, : len(p) + len(t)] = torch.tensor(p + t)
        pred = model(input_ids=ids.to(device)).logits.argmax(-1).cpu()
        for row, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            # logits at position j predict token j + 1
            guess = pred[row, len(p) - 1 : len(p) + len(t) - 1]
            out.append(bool(torch.equal(guess, torch.tensor(t))))
    return out


def accuracy(model, tokenizer, examples: list[Example]) -> float:
    hits = greedy_correct(model, tokenizer, examples)
    return sum(hits) / len(hits)
