"""Sparsification of a task vector (expert - base): the "drop" step of TIES, DARE,
Breadcrumbs and DELLA. Each returns what to keep; rescaling is separate.

TIES and Breadcrumbs keep entries by magnitude rank. Their selections never sort and never
hold a full-size task vector: :func:`top_k` finds the k-th largest magnitude by selection in a
narrow band bracketed from a small sample (falling back to ``kthvalue`` over everything when
the bracket misses; the result is exact either way), and the keep-mask is a rule (:class:`Ranked`)
that the merge applies block by block. DARE's masks are random draws (one byte per entry).
DELLA alone ranks, because its keep probability depends on each entry's rank within its row.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.methods.blockwise import Elementwise, as_float, block_sums
from evomerge.methods.registry import work_dtype

_SAMPLE = 65536  # entries sampled to bracket the threshold
_SLACK = 0.01  # bracket width around the target quantile, as a fraction of the sample


@dataclass(frozen=True)
class TopK:
    """The ``k`` largest entries of a flat tensor, as a rule that any block can apply: entries
    above ``value``, and of those equal to it the ones before flat index ``cut`` (among equal
    values the lowest indices win, so the top a contain the top b for a > b)."""

    value: torch.Tensor  # 0-d, in the magnitudes' dtype
    cut: int

    def block(self, values: torch.Tensor, r: slice) -> torch.Tensor:
        """The rule on ``values``, the entries ``r`` of the tensor it was found on."""
        if r.stop <= self.cut:
            return values >= self.value
        keep = values > self.value
        if r.start < self.cut:
            head = slice(0, self.cut - r.start)
            keep[head] |= values[head] == self.value
        return keep


@dataclass(frozen=True)
class Ranked:
    """A keep-rule by magnitude rank: the ``upper`` largest entries of ``magnitude`` except the
    ``lower`` largest (None: except none). Applied block by block, so a TIES or Breadcrumbs
    merge never holds a full-size task vector, magnitude or mask."""

    magnitude: Elementwise  # |task vector|, a function of the merge's inputs
    upper: TopK
    lower: TopK | None = None

    def block(self, magnitude: torch.Tensor, r: slice) -> torch.Tensor:
        keep = self.upper.block(magnitude, r)
        if self.lower is not None:
            keep &= ~self.lower.block(magnitude, r)
        return keep

    def mask(self) -> torch.Tensor:
        """The whole rule as a boolean tensor of the magnitude's shape."""
        like = self.magnitude.inputs[0]
        out = torch.empty(like.shape, dtype=torch.bool, device=like.device)
        flat = out.view(-1)
        for r, m in self.magnitude.blocks():
            flat[r] = self.block(m, r)
        return out


def top_k(magnitude: Elementwise, k: int) -> TopK:
    """The rule keeping the ``k`` largest entries of ``magnitude``, found by selection, never a
    sort: the k-th largest value is bracketed from a sample, one pass over the blocks counts the
    entries above the bracket and gathers those inside it (with their positions), and
    ``kthvalue`` over that narrow band finds it exactly. A bracket that misses, or a tensor too
    small to sample, falls back to ``kthvalue`` over everything; the result is the same."""
    n = magnitude.numel
    first = magnitude.inputs[0]
    if k <= 0:
        return TopK(torch.tensor(float("inf"), device=first.device), 0)
    if k >= n:
        return TopK(torch.tensor(float("-inf"), device=first.device), n)
    if n > 8 * _SAMPLE:
        g = torch.Generator(device=first.device).manual_seed(n)
        sample = magnitude.gather(torch.randint(n, (_SAMPLE,), generator=g, device=first.device))
        q = 1 - k / n
        bracket = torch.tensor([max(0.0, q - _SLACK), min(1.0, q + _SLACK)], device=first.device)
        lo, hi = torch.quantile(sample.float(), bracket).to(sample.dtype)
        above, values, positions = 0, [], []
        for r, m in magnitude.blocks():
            above += int(torch.count_nonzero(m > hi))
            inside = ((m >= lo) & (m <= hi)).nonzero().flatten()
            values.append(m[inside])
            positions.append(inside.add_(r.start))
        band = torch.cat(values)
        need = k - above  # the need-th largest inside the band
        if 1 <= need <= band.numel():
            return _rule(band, torch.cat(positions), need)
    return _rule(torch.cat([m for _, m in magnitude.blocks()]), None, k)


def _rule(values: torch.Tensor, positions: torch.Tensor | None, need: int) -> TopK:
    """The rule whose threshold is the ``need``-th largest of ``values``: the entries at
    ``positions`` (increasing; None: 0, 1, ...) of a tensor whose other entries lie either above
    all of them (as many as were counted into ``need``) or below."""
    value = torch.kthvalue(values, values.numel() - need + 1).values
    missing = need - int(torch.count_nonzero(values > value))  # >= 1: taken from the ties
    ties = (values == value).nonzero().flatten()
    last = ties[missing - 1] if positions is None else positions[ties[missing - 1]]
    return TopK(value, int(last) + 1)


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: floor(density * numel), but at least one (as mergekit)."""
    return max(1, int(density * numel))


def task_vector_magnitude(base: torch.Tensor, x: torch.Tensor) -> Elementwise:
    """|x - base| in the work dtype, block by block."""
    dtype = work_dtype(base)
    return Elementwise(lambda b, x: x.to(dtype, copy=True).sub_(b.to(dtype)).abs_(), [base, x])


def magnitude_rule(magnitude: Elementwise, density: float) -> Ranked | None:
    """TIES: keep the ``density`` fraction of entries with the largest magnitude (None: all)."""
    n = magnitude.numel
    if density >= 1 or n == 0:
        return None
    return Ranked(magnitude, top_k(magnitude, 0 if density <= 0 else keep_count(n, density)))


def outlier_rule(magnitude: Elementwise, density: float, gamma: float) -> Ranked | None:
    """Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries,
    keeping ``density`` of them (None: all). When both cannot hold, fewer outliers are dropped.

    mergekit's older releases emptied the whole delta when floor(gamma * numel) was 0; here
    (as in mergekit 0.1.5) no outlier is dropped then, and the ``density`` largest are kept.
    """
    n = magnitude.numel
    if density >= 1 or n == 0:
        return None
    keep = int(density * n)
    outliers = min(int(gamma * n), n - keep)
    lower = top_k(magnitude, outliers) if outliers else None
    return Ranked(magnitude, top_k(magnitude, keep + outliers), lower)


def _whole(rule: Ranked | None, delta: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(delta, dtype=torch.bool) if rule is None else rule.mask()


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`magnitude_rule` of a task vector, as a boolean tensor."""
    return _whole(magnitude_rule(Elementwise(torch.abs, [delta]), density), delta)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """:func:`outlier_rule` of a task vector, as a boolean tensor."""
    return _whole(outlier_rule(Elementwise(torch.abs, [delta]), density, gamma), delta)


def random_mask(like: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry of a tensor shaped ``like`` independently with probability
    ``density``: a uniform 32-bit draw below ``density * 2**32`` (see :func:`_draws`)."""
    if density >= 1:
        return torch.ones_like(like, dtype=torch.bool)
    if like.device.type != "cpu":
        return torch.rand(like.shape, generator=generator, device=like.device) < density
    mask = torch.empty(like.shape, dtype=torch.bool)
    flat = mask.numpy().reshape(-1)
    threshold = np.uint32(min(int(density * 2**32), 2**32 - 1))
    _draws(flat.size, generator, lambda r, raw: np.less(raw, threshold, out=flat[r]))
    return mask


def uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 draws, reproducible from ``generator``: the top 24 bits of the
    32-bit draws of :func:`_draws` on CPU, torch's generator elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.rand(shape, generator=generator, device=device)
    out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=np.float32)

    def fill(r: slice, raw: np.ndarray) -> None:
        np.multiply(raw >> np.uint32(8), np.float32(2.0**-24), out=out[r], casting="unsafe")

    _draws(out.size, generator, fill)
    return torch.from_numpy(out).reshape(shape)


STREAM = 1 << 20  # draws per independent stream; part of the definition of every random mask


def _draws(n: int, generator: torch.Generator | None, use: Callable[[slice, np.ndarray], object]) -> None:
    """Make ``n`` uniform uint32 draws and hand them over in ranges: ``use(range, draws)``.

    One draw of ``generator`` seeds the whole tensor; its range j = [j * STREAM, (j+1) * STREAM)
    comes from NumPy's PCG64 keyed by (seed, j). The ranges are independent streams, so they are
    drawn on all of torch's threads at once (NumPy releases the GIL), and the result depends on
    the seed alone: not on the thread count, the block size of the merge or the order of work.
    Raw draws are ~3x cheaper than NumPy's float32 ones and ~6x cheaper than torch's CPU
    generator, which made DARE's masks most of its merge time."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    def one(j: int) -> None:
        r = slice(j * STREAM, min(n, (j + 1) * STREAM))
        bits = np.random.PCG64(np.random.SeedSequence([seed, j]))
        use(r, bits.random_raw((r.stop - r.start + 1) // 2).view(np.uint32)[: r.stop - r.start])

    count = -(-n // STREAM)
    threads = min(count, torch.get_num_threads())
    if threads <= 1:
        for j in range(count):
            one(j)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))  # list(): re-raise what a range raised


def della_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA (MagPrune): within each row, the keep probability rises linearly with the
    magnitude rank from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).
    At density 0 nothing is kept, at 1 everything (as mergekit)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width, device=delta.device).expand_as(order))
    position = ranks.float() / max(1, width - 1)
    probs = (density - epsilon) + position * (2 * epsilon)
    draw = uniform(probs.shape, generator, delta.device)
    return (draw < probs).reshape(delta.shape)


def rescale_factor(
    base: torch.Tensor, x: torch.Tensor, kept: torch.Tensor | Ranked | None, mode: str, density: float
) -> float:
    """The factor scaling the kept entries of the task vector ``x - base`` back up.

    ``l1`` (mergekit's choice, the default): the L1 norm of the kept entries becomes the
    undropped one (computed block by block, without a full-size task vector).
    ``inverse_density``: 1/density, the unbiased estimator of the DARE paper.
    ``none``: no rescaling.
    """
    if kept is None or mode == "none":
        return 1.0
    if mode == "inverse_density":
        return 1 / density if 0 < density < 1 else 1.0
    dtype = work_dtype(base)

    rule = kept if isinstance(kept, Ranked) else None

    def norms(r, b, x, mask):
        d = x.to(dtype, copy=True).sub_(b.to(dtype)).abs_()
        mask = rule.block(d, r) if rule is not None else mask
        return [d.sum(), d.mul_(as_float(mask, dtype)).sum()]  # the same order of addition

    before, after = block_sums(norms, [base, x, None if rule else kept], positional=True)
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0
