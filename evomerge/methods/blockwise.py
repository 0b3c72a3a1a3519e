"""Block-by-block evaluation of a merge's elementwise part.

A merge of bf16 checkpoints is memory-bound: each full-size float32 temporary costs a pass
over main memory. Most methods end in an elementwise function of their aligned inputs (a
weighted sum, SLERP once its angle is known, TIES once its masks are known). A method
returns that part as an :class:`Elementwise` instead of a tensor, and the engine evaluates
it on CPU in blocks of :data:`BLOCK` entries: the float32 temporaries of a block stay in
cache, and each block is written straight into the output dtype, so main memory sees the
inputs read once and the output written once. Elsewhere (CUDA) it is one block.

Per-tensor reductions that such methods need first (norms, dot products, L1 norms) go
through :func:`block_sums` for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BLOCK = 1 << 19  # entries per block on CPU: the float32 temporaries of a block stay in cache


def block_ranges(numel: int, device: torch.device) -> Iterator[slice]:
    """Flat ranges covering ``numel`` entries: blocks of :data:`BLOCK` on CPU, one elsewhere."""
    if numel == 0:
        yield slice(0, 0)
        return
    step = BLOCK if device.type == "cpu" else numel
    for start in range(0, numel, step):
        yield slice(start, min(start + step, numel))


@dataclass
class Elementwise:
    """``fn(*blocks)`` applied to aligned flat blocks of ``inputs`` (None stays None) gives the
    same block of the result, computed in the work dtype. ``inputs[0]`` fixes shape and device.
    With ``positional``, ``fn`` also gets the block's flat range first: ``fn(range, *blocks)``."""

    fn: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor | None]
    positional: bool = False

    @property
    def numel(self) -> int:
        return self.inputs[0].numel()

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """Every block of the result (in the work dtype) with its flat range, in order."""
        first = self.inputs[0]
        flats = [None if x is None else x.reshape(-1) for x in self.inputs]
        for r in block_ranges(first.numel(), first.device):
            blocks = [None if x is None else x[r] for x in flats]
            yield r, self.fn(r, *blocks) if self.positional else self.fn(*blocks)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The entries at flat positions ``index`` (for functions that ignore positions)."""
        assert not self.positional
        return self.fn(*[None if x is None else x.reshape(-1)[index] for x in self.inputs])

    def materialize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The result in ``dtype``, written block by block into ``out`` (a contiguous tensor of
        the inputs' shape, dtype and device) or into a new tensor."""
        first = self.inputs[0]
        if out is None:
            out = torch.empty(first.shape, dtype=dtype, device=first.device)
        elif out.shape != first.shape or out.dtype != dtype or out.device != first.device:
            raise ValueError(f"out is {out.dtype} {list(out.shape)} on {out.device}")
        target = out.view(-1)
        for r, block in self.blocks():
            target[r].copy_(block)
        return out


def as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean tensor as 0/1 in ``dtype``, through its bytes (bool -> float32 directly is
    ~6x slower on CPU)."""
    return mask.view(torch.uint8).to(dtype)


def linear_combination(
    inputs: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype
) -> Elementwise:
    """sum_i c_i x_i, accumulated in ``dtype``, one pass per input within each block."""

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        acc = torch.mul(xs[0].to(dtype), coefficients[0])
        for c, x in zip(coefficients[1:], xs[1:], strict=True):
            acc.add_(x, alpha=c)  # promotes x to the accumulator's dtype on the fly
        return acc

    return Elementwise(fn, list(inputs))


def block_sums(
    fn: Callable[..., list[torch.Tensor]], inputs: list[torch.Tensor | None], positional: bool = False
) -> list[float]:
    """Sums over all entries of the reductions ``fn(*blocks)`` (``fn(range, *blocks)`` with
    ``positional``) returns, each a 0-d tensor of one block, accumulated across blocks in double
    precision."""
    totals: list[float] | None = None
    for _, block in Elementwise(fn, inputs, positional).blocks():
        parts = [float(p) for p in block]
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts, strict=True)]
    assert totals is not None  # block_ranges yields at least one range
    return totals
