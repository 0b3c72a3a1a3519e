"""Merges on the sphere: SLERP, NuSLERP, Multi-SLERP and the Karcher mean, all in torch."""

from __future__ import annotations

import math

import torch

from evomerge.methods.blockwise import block_sums, linear_combination
from evomerge.methods.registry import BasePolicy, MergeMethod, Param, Scope, register, work_dtype

COLLINEAR = 0.9995  # |cos| above this: the arc is a line, interpolate linearly


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(c0, c1) with slerp(t, a, b) = c0 a + c1 b: the angle comes from the directions, the
    result is built from the originals (so norms interpolate too)."""
    dtype = work_dtype(a)

    def sums(x, y):  # cos = <a, b> / (|a| |b|) from three reductions, block by block
        x, y = x.to(dtype), y.to(dtype)
        return [torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)]

    dot, aa, bb = block_sums(sums, [a, b])
    na, nb = math.sqrt(aa), math.sqrt(bb)
    cos = min(1.0, max(-1.0, dot / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))))
    if abs(cos) > COLLINEAR:
        return 1 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def _slerp(base, tensors, per_model, params, generator):
    c0, c1 = slerp_coefficients(params["t"], base, tensors[0])
    return linear_combination([base, tensors[0]], [c0, c1], work_dtype(base))


def _nuslerp_rows(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP along the last dimension, row by row (a and b are 2-D)."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    arc = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(collinear, (1 - t) * a + t * b, arc)


def _nuslerp(base, tensors, per_model, params, generator):
    dtype = work_dtype(tensors[0])
    w0, w1 = per_model["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    x0, x1 = tensors[0].to(dtype), tensors[1].to(dtype)
    if base is not None:
        x0, x1 = x0 - base.to(dtype), x1 - base.to(dtype)
    shape = x0.shape
    if params.get("nuslerp_flatten", True):
        out = _nuslerp_rows(t, x0.reshape(1, -1), x1.reshape(1, -1))
    elif params.get("nuslerp_row_wise", False) and x0.dim() > 1:
        out = _nuslerp_rows(t, x0.transpose(0, -1), x1.transpose(0, -1)).transpose(0, -1)
    else:
        two_d = (lambda x: x.reshape(1, -1)) if x0.dim() < 2 else (lambda x: x.reshape(-1, shape[-1]))
        out = _nuslerp_rows(t, two_d(x0), two_d(x1))
    out = out.reshape(shape)
    return out + base.to(dtype) if base is not None else out


def _multislerp(base, tensors, per_model, params, generator):
    dtype = work_dtype(tensors[0])
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    eps = params.get("eps", 1e-8)
    shape = tensors[0].shape
    xs = torch.stack([x.to(dtype) for x in tensors])
    if base is not None:
        xs = xs - base.to(dtype)
    flat = xs.reshape(len(tensors), -1)
    w = torch.tensor(per_model["weight"], dtype=dtype, device=flat.device)
    if params.get("normalize_weights", True):
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted mean of the directions is zero")
        out = (flat * w[:, None]).sum(0)
    else:
        mean = mean / mean.norm()
        tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
        tn = tangent.norm() + eps
        out = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(shape)
    return out + base.to(dtype) if base is not None else out


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Riemannian (Karcher) mean of the directions, scaled by the mean norm; equal weights."""
    dtype = work_dtype(tensors[0])
    xs = [x.to(dtype).reshape(-1) for x in tensors]
    alpha = 1.0 / len(xs)
    norms = [x.norm() for x in xs]
    units = [x / n for x, n in zip(xs, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros_like(tensors[0], dtype=dtype)
    a = 1.0 / len(units)
    mean = sum(a * u for u in units)
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cos = torch.dot(mean, u).clamp(-1, 1)
            theta = torch.acos(cos)
            if theta < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        if mean.norm() > tol:
            mean = mean / mean.norm()
    scale = sum(alpha * n for n in norms)
    return (scale * mean).reshape(tensors[0].shape)


def _karcher(base, tensors, per_model, params, generator):
    every = ([base] if base is not None else []) + list(tensors)
    if len(every) == 1:
        return every[0].to(work_dtype(every[0]))
    return karcher_mean(every, int(params.get("max_iter", 10)), params.get("tol", 1e-5))


register(
    MergeMethod(
        "slerp",
        _slerp,
        (Param("t", float, Scope.GLOBAL, None, 0.0, 1.0, doc="0 gives base_model, 1 the other model"),),
        BasePolicy.REQUIRED,
        min_models=1,
        max_models=1,
        doc="Spherical interpolation of whole tensors between base_model (t=0) and the other model "
        "(t=1); linear when nearly collinear. Shoemake 1985.",
    )
)
register(
    MergeMethod(
        "nuslerp",
        _nuslerp,
        (
            Param("weight", float, Scope.PER_MODEL, None, doc="t = w_2 / (w_1 + w_2)"),
            Param("nuslerp_flatten", bool, Scope.GLOBAL, True, doc="slerp whole tensors"),
            Param("nuslerp_row_wise", bool, Scope.GLOBAL, False, doc="slerp columns instead of rows"),
        ),
        BasePolicy.OPTIONAL,
        min_models=2,
        max_models=2,
        doc="SLERP of two models (or, with a base, of their task vectors) at t = w_2 / (w_1 + w_2), "
        "per tensor, row or column.",
    )
)
register(
    MergeMethod(
        "multislerp",
        _multislerp,
        (
            Param("weight", float, Scope.PER_MODEL, None, doc="barycentric weight"),
            Param("normalize_weights", bool, Scope.GLOBAL, True, doc="weights sum to one"),
            Param("eps", float, Scope.GLOBAL, 1e-8, 0.0, None, doc="numerical floor"),
        ),
        BasePolicy.OPTIONAL,
        min_models=1,
        doc="Weighted spherical barycentre: average in the tangent space at the weighted mean "
        "direction, map back, scale by the weighted mean norm (task vectors when a base is given).",
    )
)
register(
    MergeMethod(
        "karcher",
        _karcher,
        (
            Param("max_iter", int, Scope.GLOBAL, 10, 1, None, doc="Riemannian gradient steps"),
            Param("tol", float, Scope.GLOBAL, 1e-5, 0.0, None, doc="stop when the step is below this"),
        ),
        BasePolicy.NONE,
        min_models=1,
        doc="Karcher (Riemannian) mean on the unit sphere of all models, equal weights, scaled by "
        "the mean norm. Karcher 1977.",
    )
)
