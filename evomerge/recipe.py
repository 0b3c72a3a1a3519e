"""Merge recipes: mergekit's YAML schema, parsed, validated and resolved per tensor.

A recipe names the models, the merge method and its parameters. A parameter value is a
scalar, a *gradient* (a list interpolated across the layers of a slice), or a list of
``{filter, value}`` entries where the first filter found in the tensor name wins::

    merge_method: ties
    base_model: zoo/base
    models:
      - model: zoo/add
        parameters:
          weight: [0.2, 1.0]            # rises linearly from the first to the last layer
          density:
            - filter: self_attn
              value: 0.5
            - value: 0.8                # everything else
    parameters: {normalize: true}
    dtype: float32
    evomerge: {seed: 7}                 # evomerge's own block; mergekit ignores it

Lookup order for a parameter (first hit wins, as in mergekit): the model's own entry in the
slice, the slice's ``parameters``, the top-level ``parameters``, then the method default.

A file may also hold several YAML documents, as ``mergekit-multi`` runs them
(:class:`StagedRecipe`): named stages, then one unnamed final recipe, where a stage's name
used as a model means that stage's output. A search that picks a different merge method per
layer group writes one: a stage per method, then a passthrough that takes each group's
layers from its method's stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.methods import get_method
from evomerge.methods.registry import Param, Scope
from evomerge.validation import read_yaml, validate

Scalar = Union[bool, int, float, str]  # noqa: UP007 (pydantic union order matters)
DTYPES = ("float32", "float16", "bfloat16", "float64")


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar]]  # noqa: UP007


Setting = Union[list[Conditional], Conditional, list[Scalar], Scalar]  # noqa: UP007
Parameters = dict[str, Setting]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v):
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None


class Provenance(BaseModel):
    """evomerge's own fields: mergekit ignores the whole ``evomerge:`` block."""

    model_config = ConfigDict(extra="allow")
    seed: int = 0  # seeds the stochastic methods (DARE, DELLA), per tensor


class MergeRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    evomerge: Provenance = Field(default_factory=Provenance)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models` or `slices`")
        method = get_method(self.merge_method)  # raises on an unknown name
        known = {p.name for p in method.params}
        for where, params in self._parameter_blocks():
            for key in params or {}:
                if key not in known:
                    raise ValueError(
                        f"{where}: unknown parameter {key!r} for {self.merge_method}; "
                        f"allowed: {', '.join(sorted(known)) or 'none'}"
                    )
        return self

    def _parameter_blocks(self):
        yield "parameters", self.parameters
        for m in self.models or []:
            yield f"models[{m.model}].parameters", m.parameters
        for i, s in enumerate(self.slices or []):
            yield f"slices[{i}].parameters", s.parameters
            for src in s.sources:
                yield f"slices[{i}].sources[{src.model}].parameters", src.parameters

    # -- files ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> MergeRecipe:
        return cls.parse(read_yaml(Path(path), "recipe"), where=str(path))

    @classmethod
    def parse(cls, data: Any, where: str = "recipe") -> MergeRecipe:
        if not isinstance(data, dict):
            raise EvomergeError(f"{where}: a recipe must be a mapping with merge_method, models or slices")
        return validate(cls, data, where)

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json", exclude_none=True)
        if data.get("evomerge") == {"seed": 0}:
            data.pop("evomerge")
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file renamed into place)."""
        _write_atomically(Path(path), self.to_yaml())

    def digest(self) -> str:
        """A stable hash of what the recipe means (equal recipes, equal digests)."""
        return _digest([self.to_dict()])

    # -- structure -----------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Every model the recipe refers to, in order of first mention (base first)."""
        names = [self.base_model] if self.base_model else []
        for m in self.models or []:
            names.append(m.model)
        for s in self.slices or []:
            names += [s.base_model] if s.base_model else []
            names += [src.model for src in s.sources]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class StagedRecipe:
    """Named stages and a final recipe over them: ``mergekit-multi``'s multi-document YAML.
    A stage may use earlier stages as models; the final recipe uses stages and/or models."""

    stages: dict[str, MergeRecipe]
    final: MergeRecipe

    @property
    def evomerge(self) -> Provenance:
        return self.final.evomerge

    def documents(self) -> list[dict]:
        return [{"name": n, **r.to_dict()} for n, r in self.stages.items()] + [self.final.to_dict()]

    def to_yaml(self) -> str:
        return "---\n".join(yaml.dump(d, Dumper=_RecipeDumper, sort_keys=False) for d in self.documents())

    def save(self, path: str | Path) -> None:
        _write_atomically(Path(path), self.to_yaml())

    def digest(self) -> str:
        return _digest(self.documents())

    def model_names(self) -> list[str]:
        """The checkpoints it reads (stage names excluded), in order of first mention."""
        names = [n for r in [*self.stages.values(), self.final] for n in r.model_names()]
        return [n for n in dict.fromkeys(names) if n not in self.stages]


Recipe = Union[MergeRecipe, StagedRecipe]  # noqa: UP007


def parse_recipe(documents: list, where: str = "recipe") -> Recipe:
    """One recipe, or named stages followed by one unnamed final recipe."""
    if len(documents) == 1:
        return MergeRecipe.parse(documents[0], where)
    stages: dict[str, MergeRecipe] = {}
    final = None
    for i, doc in enumerate(documents):
        here = f"{where} (document {i + 1})"
        if not isinstance(doc, dict):
            raise EvomergeError(f"{here}: a recipe must be a mapping with merge_method, models or slices")
        doc = dict(doc)
        name = doc.pop("name", None)
        if final is not None:
            raise EvomergeError(f"{here}: only the last document may be unnamed (the final merge)")
        if name is None:
            final = MergeRecipe.parse(doc, here)
            continue
        if name in stages:
            raise EvomergeError(f"{here}: stage name {name!r} is used twice")
        stages[name] = MergeRecipe.parse(doc, here)
        later = [m for m in stages[name].model_names() if m not in stages and m in _names(documents[i + 1 :])]
        if later:
            raise EvomergeError(f"{here}: stage {name!r} uses stage {later[0]!r}, which comes after it")
    if final is None:
        raise EvomergeError(f"{where}: several documents but no unnamed final merge")
    return StagedRecipe(stages, final)


def _names(documents: list) -> set:
    return {d.get("name") for d in documents if isinstance(d, dict) and d.get("name")}


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file: one document, or mergekit-multi's several (see :class:`StagedRecipe`)."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as e:
        raise EvomergeError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise EvomergeError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not documents:
        raise EvomergeError(f"{path}: the recipe is empty")
    return parse_recipe(documents, str(path))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _digest(documents: list[dict]) -> str:
    text = "---\n".join(yaml.safe_dump(d, sort_keys=True) for d in documents)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _RecipeDumper(yaml.SafeDumper):
    """Lists of numbers (gradients) in flow style, as mergekit writes them."""


_RecipeDumper.add_representer(
    list,
    lambda d, data: d.represent_sequence(
        "tag:yaml.org,2002:seq",
        data,
        flow_style=all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data),
    ),
)


# -- resolving one parameter for one tensor ------------------------------------------------


def evaluate(setting: Setting, tensor_name: str, t: float, param: Param, where: str):
    """The value of ``setting`` for a tensor at relative depth ``t`` in [0, 1], or None when
    no filter matches. Numeric gradients interpolate linearly; other lists pick a step."""
    if isinstance(setting, (Conditional, dict)):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, (Conditional, dict)) for c in setting):
        setting = [c if isinstance(c, Conditional) else Conditional.model_validate(c) for c in setting]
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, tensor_name, t, param, where)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [param.check(v, where) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        return param.check((1 - frac) * values[i0] + frac * values[i1], where)
    return param.check(setting, where)


def resolve(
    param: Param,
    blocks: list[Parameters | None],
    tensor_name: str,
    t: float,
    where: str,
):
    """First block (highest precedence first) that sets ``param`` for this tensor wins."""
    for block in blocks:
        if block and param.name in block:
            value = evaluate(block[param.name], tensor_name, t, param, where)
            if value is not None:
                return value
    if param.required:
        raise EvomergeError(f"{where}: missing required parameter {param.name!r} for {tensor_name}")
    return param.default


def resolve_all(
    method_name: str,
    tensor_name: str,
    t: float,
    shared_blocks: list[Parameters | None],
    model_blocks: list[list[Parameters | None]],
    model_labels: list[str],
    input_names: list[str] | None = None,
) -> tuple[dict, dict[str, list]]:
    """Global and per-model parameter values of one output tensor. ``model_blocks[i]`` lists
    the blocks consulted for model i, most specific first. Per-model values are matched
    against the name the tensor has in that model (``input_names[i]``; default: the output's
    name), which differs in ``slices:`` taken from other layers, as mergekit does."""
    names = input_names or [tensor_name] * len(model_labels)
    method = get_method(method_name)
    shared = {
        p.name: resolve(p, shared_blocks, tensor_name, t, "parameters")
        for p in method.params
        if p.scope is Scope.GLOBAL
    }
    per_model = {
        p.name: [
            resolve(p, blocks, name, t, f"model {label}")
            for blocks, label, name in zip(model_blocks, model_labels, names, strict=True)
        ]
        for p in method.params
        if p.scope is Scope.PER_MODEL
    }
    return shared, per_model
