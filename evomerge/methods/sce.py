"""SCE: select high-variance entries, weight experts by task-vector energy, erase minority signs."""

from __future__ import annotations

import torch

from evomerge.methods.registry import BasePolicy, MergeMethod, Param, Scope, register, work_dtype


def _sce(base, tensors, per_model, params, generator):
    dtype = work_dtype(base)
    b = base.to(dtype)
    deltas = torch.stack([x.to(dtype) - b for x in tensors])
    topk = params.get("select_topk", 1.0)
    if topk < 1:
        var = deltas.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(var).item() * topk) if topk > 0 else 0
        keep = torch.zeros(var.numel(), dtype=dtype, device=b.device)
        if k > 0:
            keep[torch.topk(var.reshape(-1), k).indices] = 1
        deltas = deltas * keep.reshape(var.shape)
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(dtype)
    agree = (deltas.sign() == elected).to(dtype)
    energy = deltas.square().reshape(len(tensors), -1).mean(dim=1)
    total = energy.sum()
    w = energy / total if total.abs() >= 1e-6 else torch.full_like(energy, 1 / len(tensors))
    w = w.reshape(-1, *([1] * b.dim())) * agree
    return b + (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


register(
    MergeMethod(
        "sce",
        _sce,
        (
            Param(
                "select_topk", float, Scope.GLOBAL, 1.0, 0.0, 1.0, doc="fraction of entries kept by variance"
            ),
            Param(
                "int8_mask", bool, Scope.GLOBAL, False, doc="accepted for mergekit compatibility; no effect"
            ),
        ),
        BasePolicy.REQUIRED,
        min_models=1,
        doc="Keep the top `select_topk` entries by variance across experts, weight each expert by "
        "mean(d_i^2), keep entries agreeing with the elected sign. Wan et al. 2024, arXiv:2408.07990.",
    )
)
