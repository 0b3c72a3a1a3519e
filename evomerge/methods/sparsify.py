"""Sparsification of a task vector (expert - base): the "drop" step of TIES, DARE,
Breadcrumbs and DELLA. Each function returns a keep-mask; rescaling is separate.

Magnitude selections never sort: a k-th-largest threshold is found by selection, first in
a narrow band bracketed from a small sample, falling back to ``kthvalue`` over everything
when the bracket misses (the result is exact either way). DELLA alone ranks, because its
keep probability depends on each entry's rank within its row.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from evomerge.methods.blockwise import as_float, block_sums
from evomerge.methods.registry import work_dtype

_SAMPLE = 65536  # entries sampled to bracket the threshold
_SLACK = 0.01  # bracket width around the target quantile, as a fraction of the sample


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D tensor; among equal values at the
    threshold, the lowest indices win (so top_k_mask(v, a) contains top_k_mask(v, b) for a > b)."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = _kth_largest(values, k)
    mask = values > threshold
    missing = k - int(torch.count_nonzero(mask))  # (a bool .sum() is ~25x slower on CPU)
    if missing > 0:  # fill from the entries equal to the threshold, lowest index first
        ties = (values == threshold).nonzero().flatten()[:missing]
        mask[ties] = True
    return mask


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if n > 8 * _SAMPLE:
        g = torch.Generator(device=values.device).manual_seed(n)
        sample = values[torch.randint(n, (_SAMPLE,), generator=g, device=values.device)]
        q = 1 - k / n
        lo_q, hi_q = max(0.0, q - _SLACK), min(1.0, q + _SLACK)
        bracket = torch.tensor([lo_q, hi_q], device=values.device)
        lo, hi = torch.quantile(sample.float(), bracket).to(values.dtype)
        above = int(torch.count_nonzero(values > hi))
        if above < k:
            band = values[(values >= lo) & (values <= hi)]
            need = k - above  # the need-th largest inside the band
            if need <= band.numel():
                return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: floor(density * numel), but at least one (as mergekit)."""
    return max(1, int(density * numel))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES)."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return top_k_mask(delta.abs().reshape(-1), keep_count(n, density)).reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries,
    keeping ``density`` of them. When both cannot hold, fewer outliers are dropped.

    mergekit's older releases emptied the whole delta when floor(gamma * numel) was 0; here
    (as in mergekit 0.1.5) no outlier is dropped then, and the ``density`` largest are kept.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    outliers = min(int(gamma * n), n - keep)
    magnitude = delta.abs().reshape(-1)
    mask = top_k_mask(magnitude, keep + outliers) & ~top_k_mask(magnitude, outliers)
    return mask.reshape(delta.shape)


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
    magnitude rank from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
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
    base: torch.Tensor, x: torch.Tensor, kept: torch.Tensor | None, mode: str, density: float
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

    def norms(b, x, kept):
        d = x.to(dtype, copy=True).sub_(b.to(dtype)).abs_()
        return [d.sum(), d.mul_(as_float(kept, dtype)).sum()]  # the same order of addition

    before, after = block_sums(norms, [base, x, kept])
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0
