"""Sparsification of a task vector (expert - base): the "drop" step of TIES, DARE,
Breadcrumbs and DELLA. Each function returns a keep-mask; rescaling is separate.

Selections use ``topk``, never a full sort, except DELLA, whose keep probability depends
on each entry's rank within its row.
"""

from __future__ import annotations

import torch


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
    top = torch.topk(delta.abs().reshape(-1), keep_count(n, density), sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[top] = True
    return mask.reshape(delta.shape)


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
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if keep > 0:
        ranked = torch.topk(delta.abs().reshape(-1), keep + outliers, sorted=True).indices
        mask[ranked[outliers:]] = True
    return mask.reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    probs = torch.full(delta.shape, float(density), dtype=torch.float32, device=delta.device)
    return torch.bernoulli(probs, generator=generator).bool()


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
    return torch.bernoulli(probs.clamp(0, 1), generator=generator).bool().reshape(delta.shape)


def rescale(delta: torch.Tensor, kept: torch.Tensor, mode: str, density: float) -> torch.Tensor:
    """The kept entries, scaled back up after dropping.

    ``l1`` (mergekit's choice, the default): scale so the L1 norm equals the undropped one.
    ``inverse_density``: multiply by 1/density, the unbiased estimator of the DARE paper.
    ``none``: no rescaling.
    """
    masked = delta * kept
    if mode == "none":
        return masked
    if mode == "inverse_density":
        return masked / density if 0 < density < 1 else masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)
