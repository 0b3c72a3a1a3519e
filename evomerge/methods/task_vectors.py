"""The task-vector family: sparsify each task vector, optionally elect signs, combine.

With d_i = x_i - base and weights w_i:

    d_i'  = rescale(sparsify(d_i))              # drop step (none, TIES, DARE, Breadcrumbs, DELLA)
    s     = sign(sum_i w_i d_i')  (0 counts +)  # TIES sign election, when enabled
    m_i   = [sign(d_i') == s]                   # entries that agree (zeros never do)
    out   = base + lambda * sum_i m_i w_i d_i' / (sum_i m_i w_i  if normalize)

Without election m_i = 1 and the divisor is sum_i w_i. Eight of mergekit's methods are
points of this one pipeline; their defaults follow mergekit so a recipe means the same in
both tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.methods import sparsify as sp
from evomerge.methods.blockwise import Elementwise, as_float, linear_combination
from evomerge.methods.registry import BasePolicy, MergeMethod, Param, Scope, register, work_dtype

RESCALE_MODES = ("l1", "inverse_density", "none")


@dataclass(frozen=True)
class Family:
    name: str
    drop: str | None  # None, "magnitude", "random", "outliers", "della"
    elect_sign: bool
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter
    doc: str


def combine(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    per_model: dict[str, list],
    params: dict,
    generator: torch.Generator | None,
    family: Family,
) -> Elementwise:
    # Two phases, so that no full-size float32 temporary is needed where none is inherent:
    # per model, what to keep (a rank rule, a random mask, or DELLA's mask, the only one that
    # needs the whole task vector) and a rescale factor; then the drop, the election and the
    # sum, elementwise, block by block.
    dtype = work_dtype(base)
    lam = params.get("lambda", 1.0)
    normalize = params.get("normalize", family.normalize)
    weights = per_model["weight"]
    if family.drop is None and not family.elect_sign:
        # Plain task arithmetic, rearranged to one pass per model:
        # base + s * sum w_i (x_i - base) = (1 - s * sum w) * base + sum (s * w_i) * x_i
        total = sum(weights)
        s = lam / (total if normalize and abs(total) >= 1e-8 else 1.0)
        return linear_combination([base, *tensors], [1 - s * total] + [s * w for w in weights], dtype)
    mode = params.get("rescale_norm", "l1") if params.get("rescale", family.rescale) else "none"
    masks = _keep_masks(family.drop, base, tensors, per_model, generator, dtype)
    # each model's task vector is scaled once, by its weight times its rescale factor
    scales = [
        w * sp.rescale_factor(base, x, kept, mode, per_model["density"][i] if kept is not None else 1.0)
        for i, (w, x, kept) in enumerate(zip(weights, tensors, masks, strict=True))
    ]
    n = len(tensors)
    total = sum(weights)
    rules = [m if isinstance(m, sp.Ranked) else None for m in masks]  # applied block by block
    stored = [None if isinstance(m, sp.Ranked) else m for m in masks]

    # On CPU, ops mixing dtypes (bf16 with float32, bool with float32) and boolean outputs are
    # several times slower than same-dtype float ops: everything below is float32 arithmetic.
    def merged(r: slice, b: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        b = b.to(dtype)
        deltas = []
        for x, kept, rule, c in zip(rest[:n], rest[n:], rules, scales, strict=True):
            d = x.to(dtype, copy=True).sub_(b)
            if rule is not None:  # (the magnitudes it was found on, computed the same way)
                kept = rule.block(d.abs(), r)
            if kept is not None:
                d.mul_(as_float(kept, dtype))
            deltas.append(d.mul_(c))
        mixed = deltas[0].clone() if family.elect_sign else deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if family.elect_sign:
            # elected sign e = +1 where the sum is >= 0, else -1; an entry agrees when its sign is
            # e (zeros never do): clamp(d * e, min=0) is |d| where it agrees and 0 elsewhere
            elected = mixed.sign_().add_(0.5).sign_()
            mixed = torch.zeros_like(b)
            divisor = torch.zeros_like(b) if normalize else None
            for w, d in zip(weights, deltas, strict=True):
                agreeing = d.mul_(elected).clamp_(min=0)
                mixed.add_(agreeing)
                if divisor is not None:
                    divisor.add_(agreeing.sign_(), alpha=float(w))
            mixed.mul_(elected)
            if divisor is not None:  # no agreeing entry: nothing to divide (0 / 1)
                mixed.div_(divisor.add_(as_float(divisor == 0, dtype)))
        elif normalize:
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        if lam != 1:
            mixed.mul_(lam)
        return mixed.add_(b)

    return Elementwise(merged, [base, *tensors, *stored], positional=True)


def _keep_masks(drop, base, tensors, per_model, generator, dtype) -> list[torch.Tensor | sp.Ranked | None]:
    """Each model's keep-mask of its task vector ``x - base``: a boolean tensor, a rank rule
    applied block by block, or None (keep everything)."""
    if drop is None:
        return [None] * len(tensors)
    densities = per_model["density"]
    if drop == "random":  # independent of the values: no task vector needed
        return [sp.random_mask(x, p, generator) for x, p in zip(tensors, densities, strict=True)]
    if drop == "magnitude":
        return [
            sp.magnitude_rule(sp.task_vector_magnitude(base, x), p)
            for x, p in zip(tensors, densities, strict=True)
        ]
    if drop == "outliers":
        return [
            sp.outlier_rule(sp.task_vector_magnitude(base, x), p, gamma)
            for x, p, gamma in zip(tensors, densities, per_model["gamma"], strict=True)
        ]
    b = base.to(dtype)  # DELLA ranks within rows: it sees the whole task vector
    return [
        sp.della_mask(x.to(dtype, copy=True).sub_(b), p, epsilon, generator)
        for x, p, epsilon in zip(tensors, densities, per_model["epsilon"], strict=True)
    ]


def _register(family: Family) -> None:
    params = [
        Param("weight", float, Scope.PER_MODEL, None, doc="scale of this model's task vector"),
        Param("lambda", float, Scope.GLOBAL, 1.0, doc="scale of the combined task vector"),
        Param("normalize", bool, Scope.GLOBAL, family.normalize, doc="divide by the sum of weights"),
        Param("rescale", bool, Scope.GLOBAL, family.rescale, doc="rescale kept entries after dropping"),
        Param("int8_mask", bool, Scope.GLOBAL, False, doc="accepted for mergekit compatibility; no effect"),
    ]
    if family.drop is not None:
        params.append(
            Param(
                "rescale_norm",
                str,
                Scope.GLOBAL,
                "l1",
                choices=RESCALE_MODES,
                doc="l1: match the L1 norm (mergekit); inverse_density: 1/density (the DARE paper; "
                "evomerge only: mergekit ignores this key and matches L1 norms)",
            )
        )
        params.append(Param("density", float, Scope.PER_MODEL, 1.0, 0.0, 1.0, doc="fraction of entries kept"))
    if family.drop == "outliers":
        params.append(
            Param("gamma", float, Scope.PER_MODEL, 0.01, 0.0, 1.0, doc="fraction of outliers dropped")
        )
    if family.drop == "della":
        params.append(
            Param("epsilon", float, Scope.PER_MODEL, 0.15, 0.0, 1.0, doc="spread of keep probability")
        )
    stochastic = family.drop in ("random", "della")
    validate = _della_bounds if family.drop == "della" else None

    def fn(base, tensors, per_model, global_params, generator):
        return combine(base, tensors, per_model, global_params, generator, family)

    register(
        MergeMethod(
            family.name,
            fn,
            tuple(params),
            BasePolicy.REQUIRED,
            min_models=1,
            stochastic=stochastic,
            doc=family.doc,
            validate=validate,
        )
    )


def _della_bounds(shared: dict, per_model: dict[str, list], labels: list[str]) -> str | None:
    """DELLA's keep probabilities span density +- epsilon: both must be probabilities (mergekit
    refuses the recipe otherwise, so the same recipe fails in both tools)."""
    for label, p, e in zip(labels, per_model["density"], per_model["epsilon"], strict=True):
        if 0 < p < 1 and not (p - e > 0 and p + e < 1):
            return (
                f"model {label}: density {p} and epsilon {e} give keep probabilities outside (0, 1); "
                "choose epsilon < min(density, 1 - density)"
            )
    return None


FAMILIES = [
    Family(
        "task_arithmetic",
        None,
        False,
        False,
        False,
        "base + lambda * sum w_i (x_i - base). Ilharco et al. 2023, arXiv:2212.04089.",
    ),
    Family(
        "ties",
        "magnitude",
        True,
        True,
        False,
        "Keep the top `density` of each task vector by magnitude, elect signs, average the "
        "agreeing entries. Yadav et al. 2023, arXiv:2306.01708.",
    ),
    Family(
        "dare_ties",
        "random",
        True,
        False,
        True,
        "Drop task-vector entries at random (keep `density`), rescale, then TIES sign election. "
        "Yu et al. 2024, arXiv:2311.03099.",
    ),
    Family(
        "dare_linear",
        "random",
        False,
        False,
        True,
        "Drop task-vector entries at random (keep `density`), rescale, add. Yu et al. 2024, "
        "arXiv:2311.03099.",
    ),
    Family(
        "breadcrumbs",
        "outliers",
        False,
        False,
        False,
        "Drop the largest `gamma` and the smallest entries, keeping `density`. Davari & Belilovsky "
        "2024, arXiv:2312.06795.",
    ),
    Family(
        "breadcrumbs_ties",
        "outliers",
        True,
        False,
        False,
        "Breadcrumbs drop followed by TIES sign election. arXiv:2312.06795 + arXiv:2306.01708.",
    ),
    Family(
        "della",
        "della",
        True,
        True,
        True,
        "Drop with a keep probability rising with magnitude rank (density +- epsilon), rescale, "
        "elect signs. Deep et al. 2024, arXiv:2406.11617.",
    ),
    Family(
        "della_linear",
        "della",
        False,
        False,
        True,
        "DELLA's magnitude-ranked drop without sign election. arXiv:2406.11617.",
    ),
]

for _family in FAMILIES:
    _register(_family)
