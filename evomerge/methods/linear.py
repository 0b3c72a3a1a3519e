"""Weighted averages and pass-through: the methods that need no base."""

from __future__ import annotations

from evomerge.methods.blockwise import linear_combination
from evomerge.methods.registry import BasePolicy, MergeMethod, Param, Scope, register, work_dtype


def _linear(base, tensors, per_model, params, generator):
    weights = per_model["weight"]
    total = sum(weights)
    scale = 1 / total if params.get("normalize", True) and abs(total) > 1e-8 else 1.0
    return linear_combination(tensors, [w * scale for w in weights], work_dtype(tensors[0]))


def _passthrough(base, tensors, per_model, params, generator):
    scale = per_model.get("scale", [1.0])[0]
    x = tensors[0]
    return x * scale if scale != 1.0 else x


register(
    MergeMethod(
        "linear",
        _linear,
        (
            Param("weight", float, Scope.PER_MODEL, None, doc="weight of this model"),
            Param("normalize", bool, Scope.GLOBAL, True, doc="divide by the sum of weights"),
        ),
        BasePolicy.NONE,
        min_models=1,
        doc="sum w_i x_i (/ sum w_i when normalize). Wortsman et al. 2022, arXiv:2203.05482.",
    )
)

register(
    MergeMethod(
        "passthrough",
        _passthrough,
        (Param("scale", float, Scope.PER_MODEL, 1.0, doc="multiply the tensor by this"),),
        BasePolicy.NONE,
        min_models=1,
        max_models=1,
        doc="Copy one model's tensor (times `scale`); with slices, stacks layers (frankenmerges).",
    )
)
