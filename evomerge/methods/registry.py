"""The registry of merge methods and the declared schema of their parameters.

A method is a pure function over tensors. It receives the base tensor (or None), the
other models' tensors in recipe order, the per-model parameters as lists aligned with
them, the global parameters, and a torch.Generator for stochastic methods, and returns
the merged tensor in the work dtype, or (for methods ending in elementwise arithmetic) an
:class:`~evomerge.methods.blockwise.Elementwise` the engine evaluates block by block.
Parameters are validated against the schema before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from evomerge.errors import EvomergeError
from evomerge.methods.blockwise import Elementwise


class Scope(str, Enum):
    PER_MODEL = "per_model"  # one value per merged model (weight, density, ...)
    GLOBAL = "global"  # one value for the merge (lambda, normalize, t, ...)


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, bool, int or str
    scope: Scope
    default: float | bool | int | None = None  # None: required
    low: float | None = None  # allowed range, inclusive
    high: float | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()  # for str parameters

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value, where: str):
        """Coerce and validate one value; raise an error naming ``where`` and the range."""
        if self.kind is str:
            if value not in self.choices:
                raise EvomergeError(
                    f"{where}: {self.name} must be one of {', '.join(self.choices)}, got {value!r}"
                )
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(f"{where}: {self.name} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvomergeError(f"{where}: {self.name} must be a number, got {value!r}")
        value = self.kind(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise EvomergeError(
                f"{where}: {self.name}={value} is outside its allowed range [{self.low}, {self.high}]"
            )
        return value


class BasePolicy(str, Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    NONE = "none"  # the base, if named, is merged like any other model


# fn(base, tensors, per_model, global_params, generator) -> the merged tensor, in the work
# dtype, or its elementwise remainder for the engine to evaluate block by block
MethodFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], dict[str, list], dict, torch.Generator | None],
    torch.Tensor | Elementwise,
]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn = field(repr=False)
    params: tuple[Param, ...]
    base: BasePolicy
    min_models: int = 1  # not counting the base
    max_models: int | None = None
    stochastic: bool = False
    doc: str = ""
    # a constraint across parameters: (shared, per_model, model labels) -> what is wrong, or None
    validate: Callable[[dict, dict[str, list], list[str]], str | None] | None = field(
        default=None, repr=False
    )

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check_models(self, n_models: int, has_base: bool, where: str) -> None:
        if self.base is BasePolicy.REQUIRED and not has_base:
            raise EvomergeError(f"{where}: merge_method {self.name} needs a base_model")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.min_models == self.max_models
                else f"at least {self.min_models}"
                + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise EvomergeError(
                f"{where}: merge_method {self.name} takes {want} model(s) besides the base, got {n_models}"
            )


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise RuntimeError(f"merge method {method.name} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise EvomergeError(
            f"unknown merge_method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Merge arithmetic runs in float32 (float64 stays float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def merge_tensors(
    method: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int | None = None,
    **params,
) -> torch.Tensor:
    """Apply a method to tensors directly, with defaults filled from its schema.

    Per-model parameters are lists aligned with ``tensors``:

    >>> merge_tensors("ties", [a, b], base, weight=[1, 1], density=[0.5, 0.5])
    """
    m = get_method(method)
    m.check_models(len(tensors), base is not None, method)
    unknown = set(params) - {p.name for p in m.params}
    if unknown:
        raise EvomergeError(f"{method}: unknown parameter(s) {', '.join(sorted(unknown))}")
    shared, per_model = {}, {}
    for p in m.params:
        if p.scope is Scope.GLOBAL:
            value = params.get(p.name, p.default)
            if value is None:
                raise EvomergeError(f"{method}: missing required parameter {p.name!r}")
            shared[p.name] = p.check(value, method)
        else:
            values = params.get(p.name, [p.default] * len(tensors))
            if any(v is None for v in values) or len(values) != len(tensors):
                raise EvomergeError(f"{method}: {p.name} needs one value per model")
            per_model[p.name] = [p.check(v, method) for v in values]
    labels = [f"tensors[{i}]" for i in range(len(tensors))]
    problem = m.validate(shared, per_model, labels) if m.validate else None
    if problem:
        raise EvomergeError(f"{method}: {problem}")
    generator = None
    if m.stochastic:
        device = (base if base is not None else tensors[0]).device
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        merged = m.fn(base, tensors, per_model, shared, generator)
        if isinstance(merged, Elementwise):
            return merged.materialize(work_dtype(base if base is not None else tensors[0]))
    return merged
