"""Training of the zoo's tiny Llama models: deterministic from a seed, on the CPU."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from evomerge.zoo.skills import Example


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 128


FULL_SHAPE = ModelShape()
QUICK_SHAPE = ModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def new_model(tokenizer: PreTrainedTokenizerBase, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    sample: Callable[[random.Random], Example]
    seed: int
    warmup: int = 50
    decay: bool = True  # cosine decay to 10% of lr after warm-up
    weight_decay: float = 0.0
    batch_size: int = 32
    seq_len: int = 64


def _batch(rng: random.Random, spec: TrainSpec, tokenizer, exclude: set[str]) -> torch.Tensor:
    """Rows of whole examples separated by newlines, each row starting with an example."""
    pad = tokenizer.pad_token_id
    rows = []
    for _ in range(spec.batch_size):
        ids: list[int] = []
        while True:
            ex = spec.sample(rng)
            if ex.prompt in exclude:
                continue  # evaluation prompts are never trained on
            piece = tokenizer.encode(ex.text + "\n", add_special_tokens=False)
            if ids and len(ids) + len(piece) > spec.seq_len:
                break
            ids.extend(piece[: spec.seq_len])
        rows.append(ids + [pad] * (spec.seq_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    spec: TrainSpec,
    *,
    exclude: set[str] = frozenset(),
    snapshots: dict[int, Callable[[LlamaForCausalLM], None]] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Train in place. ``snapshots[step]`` is called with the model after that many steps."""
    snapshots = snapshots or {}
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        if not spec.decay:
            return spec.lr
        progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))

    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids = _batch(rng, spec, tokenizer, exclude)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        done = step + 1
        if done % 100 == 0 or done == spec.steps:
            log(
                f"    step {done}/{spec.steps}  loss {running / (done % 100 or 100):.3f}  "
                f"{time.perf_counter() - start:.0f}s"
            )
            running = 0.0
        if done in snapshots:
            model.eval()
            snapshots[done](model)
            model.train()
    model.eval()
