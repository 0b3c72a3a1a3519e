"""Search spaces: which genes exist, their bounds, and how a genome decodes to a MergeRecipe.

A space YAML (see ``search_spaces/``) names the method (or a list to choose from), the
searchable parameters with their bounds, scale and scope, and fixed parameters::

    merge_method: dare_ties
    layer_granularity: 2          # layers per group
    smooth: false                 # true: group genes are control points of a gradient
    parameters:
      weight:  {low: 0.0, high: 1.5, scope: [group, model]}
      density: {low: 0.1, high: 1.0, scope: [group, model]}
    fixed: {normalize: false}

Scopes: ``global`` (one gene), or any product of ``group`` (per layer group, plus one for the
embeddings and one for the final norm + head), ``model`` (per expert) and ``block``
(attention / mlp / other). Every gene has a stable readable name such as
``layers_04_07.mlp.expert_add.weight``, used as the Optuna parameter name.

Optimizers see every numeric gene as a number in [0, 1]; ``decode`` maps it to its bounds
(linearly or on a log scale). The recipe is the only thing a worker needs: what was
evaluated is exactly what is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.checkpoint import Block, CheckpointReader, locate
from evomerge.errors import EvomergeError
from evomerge.methods import get_method
from evomerge.methods.registry import Scope
from evomerge.recipe import MergeRecipe, Recipe, StagedRecipe
from evomerge.validation import read_yaml, validate

SCOPES = ("group", "model", "block")
BLOCK_FILTERS = {"attention": "self_attn", "mlp": "mlp"}  # block gene -> mergekit filter
Genome = dict[str, float | str]


class ParamSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    scale: Literal["linear", "log"] = "linear"
    scope: list[str] | Literal["global"] = "global"
    initial: float | None = None  # default: the method's default if inside bounds, else the midpoint

    @field_validator("scope")
    @classmethod
    def _scope(cls, v):
        if v != "global":
            bad = [s for s in v if s not in SCOPES]
            if bad or not v or len(set(v)) != len(v):
                raise ValueError(f"scope must be 'global' or a list from {', '.join(SCOPES)}, got {v}")
        return v

    @model_validator(mode="after")
    def _bounds(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.scale == "log" and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.initial is not None and not self.low <= self.initial <= self.high:
            raise ValueError(f"initial {self.initial} is outside [{self.low}, {self.high}]")
        return self

    def decode(self, u: float) -> float:
        u = min(1.0, max(0.0, float(u)))
        if self.scale == "log":
            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)

    def encode(self, value: float) -> float:
        if self.scale == "log":
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


class SpaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str | list[str]
    method_scope: Literal["global", "group"] = "global"  # group: a method choice per layer group
    layer_granularity: int = Field(1, gt=0)
    smooth: bool = False
    parameters: dict[str, ParamSpace] = Field(default_factory=dict)
    fixed: dict[str, float | bool | int | str] = Field(default_factory=dict)
    normalize: bool | None = None  # shorthand for fixed: {normalize: ...}
    allow_negative_weights: bool = False  # let `weight` bounds go below 0 (subtracting a task vector)
    dtype: str | None = None
    optimizer: str | None = None  # the recommended default, chosen in benchmarks/optimizer_efficiency.py

    @model_validator(mode="after")
    def _check(self):
        if self.normalize is not None:
            if self.fixed.get("normalize", self.normalize) != self.normalize:
                raise ValueError("normalize and fixed.normalize disagree")
            self.fixed["normalize"] = self.normalize
        weight = self.parameters.get("weight")
        if weight is not None and weight.low < 0 and not self.allow_negative_weights:
            raise ValueError(
                f"parameters.weight.low is {weight.low}; set allow_negative_weights: true to search "
                "negative weights"
            )
        methods = self.methods
        for m in methods:
            known = {p.name for p in get_method(m).params}
            for name in [*self.parameters, *self.fixed]:
                if name not in known and len(methods) == 1:
                    raise ValueError(f"parameter {name!r} is not one of {m}'s: {', '.join(sorted(known))}")
        if self.method_scope == "group" and len(methods) < 2:
            raise ValueError("method_scope: group needs a list of at least two methods in merge_method")
        if len(methods) > 1:
            every = set().union(*({p.name for p in get_method(m).params} for m in methods))
            for name in [*self.parameters, *self.fixed]:
                if name not in every:
                    raise ValueError(f"parameter {name!r} belongs to none of {', '.join(methods)}")
        return self

    @property
    def methods(self) -> list[str]:
        return [self.merge_method] if isinstance(self.merge_method, str) else list(self.merge_method)


@dataclass(frozen=True)
class Gene:
    name: str
    param: str | None  # None: the method choice
    group: str | None = None  # "embed", "layers_00_01", ..., "head"; None when not per group
    model: str | None = None  # expert name when per model
    block: str | None = None  # "attention" | "mlp" | "other" when per block
    choices: tuple[str, ...] = ()  # categorical genes

    @property
    def categorical(self) -> bool:
        return bool(self.choices)


class SearchSpace:
    """Genes of a space for one base model and its experts; ``decode`` makes recipes."""

    def __init__(
        self, spec: SpaceSpec, base: str | Path, experts: dict[str, str | Path], where: str = "space"
    ):
        if not experts:
            raise EvomergeError(f"{where}: needs at least one expert model")
        self.spec, self.where = spec, where
        self.base, self.experts = str(base), {k: str(v) for k, v in experts.items()}
        reader = CheckpointReader(base)
        self.num_layers = reader.num_layers
        self.outside = {  # filters that select the non-layer tensors, from the base's own names
            "embed": [n for n in reader.names if locate(n).block is Block.EMBEDDING],
            "head": [
                n for n in reader.names if locate(n).layer is None and locate(n).block is not Block.EMBEDDING
            ],
        }
        g = spec.layer_granularity
        self.groups = [
            f"layers_{i:02d}_{min(i + g, self.num_layers) - 1:02d}" for i in range(0, self.num_layers, g)
        ]
        self.genes = self._make_genes()

    @classmethod
    def load(cls, path: str | Path, base, experts) -> SearchSpace:
        spec = validate(SpaceSpec, read_yaml(Path(path), "search space"), str(path))
        return cls(spec, base, experts, where=str(path))

    # -- genes ---------------------------------------------------------------------------------

    def _make_genes(self) -> list[Gene]:
        genes = []
        if len(self.spec.methods) > 1:
            choices = tuple(self.spec.methods)
            if self.spec.method_scope == "group":
                genes += [Gene(f"{g}.merge_method", None, g, choices=choices) for g in self.groups]
            else:
                genes.append(Gene("merge_method", None, choices=choices))
        for param, ps in self.spec.parameters.items():
            scope = [] if ps.scope == "global" else ps.scope
            groups = ["embed", *self.groups, "head"] if "group" in scope else [None]
            models = list(self.experts) if "model" in scope else [None]
            blocks = ["attention", "mlp", "other"] if "block" in scope else [None]
            for group, model, block in product(groups, models, blocks):
                if group in ("embed", "head") and block in BLOCK_FILTERS:
                    continue  # embeddings and head have no attention/mlp blocks
                parts = [group, block, f"expert_{model}" if model else None, param]
                genes.append(Gene(".".join(p for p in parts if p), param, group, model, block))
        return genes

    @property
    def dimension(self) -> int:
        return len(self.genes)

    def describe(self) -> str:
        lines = [f"{len(self.genes)} genes ({len(self.groups)} layer groups, {len(self.experts)} experts)"]
        for g in self.genes:
            if g.categorical:
                lines.append(f"  {g.name}: one of {', '.join(g.choices)}")
            else:
                ps = self.spec.parameters[g.param]
                lines.append(f"  {g.name}: [{ps.low}, {ps.high}] {ps.scale}")
        return "\n".join(lines)

    def initial(self) -> Genome:
        """A sensible start: each parameter at its ``initial`` (or the method default when inside
        the bounds, else the midpoint); the first listed method."""
        genome: Genome = {}
        for g in self.genes:
            if g.categorical:
                genome[g.name] = g.choices[0]
                continue
            ps = self.spec.parameters[g.param]
            value = ps.initial
            if value is None:
                default = _method_default(self.spec.methods[0], g.param)
                value = default if default is not None and ps.low <= default <= ps.high else None
            genome[g.name] = ps.encode(value) if value is not None else 0.5
        return genome

    def random(self, rng) -> Genome:
        return {g.name: rng.choice(g.choices) if g.categorical else rng.random() for g in self.genes}

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, genome: Genome, seed: int = 0) -> Recipe:
        """The recipe a genome stands for. With a method per layer group, a staged recipe (as
        mergekit-multi runs it) when the groups chose different methods: one stage per method
        over the whole model, then a passthrough taking each run of groups from its method's
        stage; the embeddings follow the first group's method, the final norm and head the
        last group's (where mergekit takes them from in slices). One method for all: one recipe."""
        missing = [g.name for g in self.genes if g.name not in genome]
        if missing:
            raise EvomergeError(f"genome lacks gene {missing[0]!r}")
        if self.spec.method_scope != "group":
            return self._decode_method(genome, genome.get("merge_method", self.spec.methods[0]), seed)
        chosen = [genome[f"{g}.merge_method"] for g in self.groups]
        if len(set(chosen)) == 1:
            return self._decode_method(genome, chosen[0], seed)
        stages = {f"stage_{m}": self._decode_method(genome, m, seed) for m in dict.fromkeys(chosen)}
        runs: list[list] = []  # [method, first layer, end layer]
        g = self.spec.layer_granularity
        for i, method in enumerate(chosen):
            end = min((i + 1) * g, self.num_layers)
            if runs and runs[-1][0] == method:
                runs[-1][2] = end
            else:
                runs.append([method, i * g, end])
        final = {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": f"stage_{m}", "layer_range": [a, b]}]} for m, a, b in runs],
            "evomerge": {"seed": seed},
        }
        return StagedRecipe(stages, MergeRecipe.parse(final, where=self.where))

    def _decode_method(self, genome: Genome, method: str, seed: int) -> MergeRecipe:
        mparams = {p.name: p for p in get_method(method).params}
        values: dict[tuple, float] = {}
        for g in self.genes:
            if not g.categorical and g.param in mparams:
                values[(g.param, g.group, g.model, g.block)] = self.spec.parameters[g.param].decode(
                    genome[g.name]
                )
        shared: dict = {k: v for k, v in self.spec.fixed.items() if k in mparams}
        per_model: dict[str, dict] = {m: {} for m in self.experts}
        for param, ps in self.spec.parameters.items():
            if param not in mparams:
                continue
            scope = [] if ps.scope == "global" else ps.scope
            if mparams[param].scope is Scope.GLOBAL or "model" not in scope:
                setting = self._setting(values, param, None, scope)
                if mparams[param].scope is Scope.GLOBAL:
                    shared[param] = setting
                else:
                    for m in self.experts:
                        per_model[m][param] = setting
            else:
                for m in self.experts:
                    per_model[m][param] = self._setting(values, param, m, scope)
        for m in self.experts:  # per-model fixed values (e.g. weight: 1.0)
            for k, v in self.spec.fixed.items():
                if k in mparams and mparams[k].scope is Scope.PER_MODEL:
                    per_model[m].setdefault(k, v)
                    shared.pop(k, None)
        uses_base = get_method(method).base.value != "none"
        data = {
            "merge_method": method,
            **({"base_model": self.base} if uses_base else {}),
            "models": [
                {"model": path, **({"parameters": per_model[m]} if per_model[m] else {})}
                for m, path in self.experts.items()
            ],
            **({"parameters": shared} if shared else {}),
            **({"dtype": self.spec.dtype} if self.spec.dtype else {}),
            "evomerge": {"seed": seed},
        }
        return MergeRecipe.parse(data, where=self.where)

    def _setting(self, values, param, model, scope):
        """A mergekit parameter setting for one (param, model): scalar, gradient, or filters."""
        if "group" not in scope and "block" not in scope:
            return values[(param, None, model, None)]
        blocks = ["attention", "mlp", "other"] if "block" in scope else [None]
        entries = []
        if "group" in scope:
            for outside in ("embed", "head"):
                for name in self.outside[outside]:
                    block = "other" if "block" in scope else None
                    entries.append(
                        {"filter": name, "value": round(values[(param, outside, model, block)], 6)}
                    )
        for block in blocks:
            if "group" in scope:
                value = self._depth_profile([values[(param, g, model, block)] for g in self.groups])
            else:
                value = round(values[(param, None, model, block)], 6)
            entry = {"value": value}
            if block in BLOCK_FILTERS:
                entry["filter"] = BLOCK_FILTERS[block]
            entries.append(entry)
        return entries if len(entries) > 1 else entries[0]["value"]

    def _depth_profile(self, group_values: list[float]) -> list[float] | float:
        """Per-group values as a mergekit gradient: smooth -> control points interpolated across
        depth; otherwise one value per layer, so each group's value is exact for its layers."""
        if len(group_values) == 1:
            return round(group_values[0], 6)
        if self.spec.smooth:
            return [round(v, 6) for v in group_values]
        g = self.spec.layer_granularity
        return [round(group_values[i // g], 6) for i in range(self.num_layers)]


def _method_default(method: str, param: str):
    p = get_method(method).param(param)
    return None if p is None or p.default is None or isinstance(p.default, bool) else float(p.default)
