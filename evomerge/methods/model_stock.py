"""Model Stock: interpolate between the experts' mean and the base by their agreement."""

from __future__ import annotations

import torch

from evomerge.methods.registry import BasePolicy, MergeMethod, Param, Scope, register, work_dtype


def _model_stock(base, tensors, per_model, params, generator):
    dtype = work_dtype(base)
    shape = base.shape
    if params.get("filter_wise", False):
        flat = (lambda x: x.to(dtype).reshape(1, -1)) if base.dim() < 2 else (lambda x: x.to(dtype))
    else:
        flat = lambda x: x.to(dtype).reshape(1, -1)  # noqa: E731
    b = flat(base)
    deltas = [flat(x) - b for x in tensors]
    cosines = []
    for i, u in enumerate(deltas):
        for v in deltas[i + 1 :]:
            denom = (u.norm(dim=-1) * v.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((u * v).sum(dim=-1) / denom).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6  # opposing updates: keep the base rather than blow up
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denom))
    mean = sum(flat(x) for x in tensors) / n
    return (t * mean + (1 - t) * b).reshape(shape)


register(
    MergeMethod(
        "model_stock",
        _model_stock,
        (Param("filter_wise", bool, Scope.GLOBAL, False, doc="one ratio per row instead of per tensor"),),
        BasePolicy.REQUIRED,
        min_models=2,
        doc="t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the task vectors; "
        "t * mean(x_i) + (1 - t) * base. Jang et al. 2024, arXiv:2403.19522.",
    )
)
