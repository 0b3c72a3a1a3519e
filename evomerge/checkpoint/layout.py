"""Where a tensor sits in a transformer: its layer index and its block kind.

The naming schemes of the supported families are data, not code: one ordered table of
patterns, first match wins. Adding a family means adding rows. Examples by family:

- Llama, Mistral, Qwen2, Gemma, Phi-3: ``model.embed_tokens.weight``,
  ``model.layers.3.self_attn.q_proj.weight`` (Phi-3: ``qkv_proj``),
  ``model.layers.3.mlp.gate_proj.weight`` (Phi-3: ``gate_up_proj``),
  ``model.layers.3.input_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight``;
- GPT-2: ``transformer.wte.weight``, ``transformer.h.3.attn.c_attn.weight``,
  ``transformer.h.3.mlp.c_fc.weight``, ``transformer.h.3.ln_1.weight``, ``transformer.ln_f.bias``;
- GPT-NeoX (Pythia): ``gpt_neox.embed_in.weight``,
  ``gpt_neox.layers.3.attention.query_key_value.weight``,
  ``gpt_neox.layers.3.mlp.dense_h_to_4h.weight``, ``gpt_neox.final_layer_norm.weight``,
  ``embed_out.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class Block(str, Enum):
    ATTENTION = "attention"
    MLP = "mlp"
    NORM = "norm"
    EMBEDDING = "embedding"
    HEAD = "head"
    OTHER = "other"


# The decoder stack: `model.layers.N.`, `transformer.h.N.`, `gpt_neox.layers.N.` (any prefix).
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")

# Ordered: the first row whose pattern is found in the name decides. Norm rows come before
# attention and mlp because some families nest norms inside them (Gemma 3's self_attn.q_norm).
BLOCK_PATTERNS: tuple[tuple[re.Pattern[str], Block], ...] = tuple(
    (re.compile(pattern), block)
    for pattern, block in [
        (r"(?:^|\.)(?:lm_head|embed_out)\.", Block.HEAD),  # llama-likes, gpt-2 / gpt-neox
        (r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe)\.", Block.EMBEDDING),
        (
            r"(?:^|\.)(?:\w*_)?(?:layer)?norm\w*\.",
            Block.NORM,
        ),  # input_layernorm, norm, q_norm, final_layer_norm
        (r"(?:^|\.)ln_\w+\.", Block.NORM),  # gpt-2: ln_1, ln_2, ln_f
        (r"(?:^|\.)(?:self_attn|attn|attention)\.", Block.ATTENTION),
        (r"(?:^|\.)(?:mlp|feed_forward)\.", Block.MLP),
    ]
)


@dataclass(frozen=True)
class TensorLocation:
    layer: int | None  # index in the decoder stack, None outside it
    block: Block


def locate(name: str) -> TensorLocation:
    """Classify one tensor name, e.g. ``model.layers.3.mlp.up_proj.weight`` -> (3, mlp)."""
    m = LAYER_PATTERN.search(name)
    layer = int(m.group(1)) if m else None
    for pattern, block in BLOCK_PATTERNS:
        if pattern.search(name):
            return TensorLocation(layer, block)
    return TensorLocation(layer, Block.OTHER)


def count_layers(names: Iterable[str]) -> int:
    """Number of decoder layers: one more than the highest layer index (0 if none)."""
    indices = [loc.layer for loc in map(locate, names) if loc.layer is not None]
    return max(indices) + 1 if indices else 0


def with_layer(name: str, layer: int) -> str:
    """The same tensor name at another decoder layer (for layer slicing)."""
    m = LAYER_PATTERN.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not inside the decoder stack")
    return name[: m.start(1)] + str(layer) + name[m.end(1) :]
