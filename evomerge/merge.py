"""Executing a recipe: for every output tensor, gather sources, resolve parameters, call
the method, and hand the result to a sink.

Planning reads only checkpoint headers and validates everything (models exist, tensors and
shapes agree, parameters are complete and in range) before the first tensor is merged, so
bad input fails before any output exists. Execution then holds only the tensors of one
output tensor in flight (plus one shard of output in the checkpoint writer).

>>> from evomerge.merge import merge
>>> merge("recipe.yaml", "out/")                      # a checkpoint, written atomically
>>> state = merge_to_state_dict(recipe)               # in memory
>>> merge_into_model(recipe, model)                   # into a resident model, in place
"""

from __future__ import annotations

import hashlib
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from evomerge.checkpoint import (
    Block,
    CheckpointReader,
    CheckpointWriter,
    TensorInfo,
    TensorSource,
    locate,
    with_layer,
)
from evomerge.errors import EvomergeError
from evomerge.methods import BasePolicy, get_method
from evomerge.methods.blockwise import Elementwise
from evomerge.methods.registry import MergeMethod
from evomerge.recipe import MergeRecipe, Parameters, Recipe, StagedRecipe, load_recipe, resolve_all

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class TensorJob:
    """How one output tensor is made."""

    out_name: str
    base: tuple[str, str] | None  # (model, tensor name) of the base, if the method uses one
    sources: list[tuple[str, str]]  # (model, tensor name) of the other inputs, in recipe order
    shared: dict
    per_model: dict[str, list]


@dataclass
class MergePlan:
    recipe: MergeRecipe
    method: MergeMethod
    readers: dict[str, TensorSource]  # by the model string used in the recipe
    jobs: list[TensorJob]
    metadata_source: Path  # config.json and friends come from here
    tokenizer_source: Path
    num_layers: int


def _open_models(
    recipe: MergeRecipe, relative_to: Path | None, cache: dict[str, TensorSource] | None
) -> dict[str, TensorSource]:
    readers = {}
    for name in recipe.model_names():
        if cache is not None and name in cache:
            readers[name] = cache[name]
            continue
        path = Path(name).expanduser()
        if not path.is_absolute() and not path.exists() and relative_to is not None:
            path = relative_to / path  # a recipe's relative paths also work from its own folder
        if not path.exists():
            raise EvomergeError(f"model {name!r}: no such directory")
        readers[name] = CheckpointReader(path)
        if cache is not None:
            cache[name] = readers[name]
    types = {n: r.config.get("model_type") for n, r in readers.items()}
    if len(set(types.values())) > 1:
        listing = ", ".join(f"{n} is {t}" for n, t in types.items())
        raise EvomergeError(f"models of different architectures cannot be merged: {listing}")
    return readers


def _depth(index: int, count: int) -> float:
    """Relative depth t of layer ``index`` of ``count`` for gradients (mergekit: one layer -> 1)."""
    return index / (count - 1) if count > 1 else 1.0


def plan_merge(
    recipe: Recipe,
    *,
    relative_to: str | Path | None = None,
    readers: dict[str, TensorSource] | None = None,
) -> MergePlan:
    """Resolve a recipe against its checkpoints; raises before any tensor is read. Pass a
    ``readers`` dict to keep checkpoints open across many plans (a search plans one per
    candidate over the same models): it is filled on first use and reused after. A staged
    recipe plans each stage, then its final recipe over the stages (:class:`StageReader`)."""
    if isinstance(recipe, StagedRecipe):
        cache = readers if readers is not None else {}
        stages: dict[str, StageReader] = {}
        for name, stage in recipe.stages.items():  # new readers go to cache, stages stay apart
            stages[name] = StageReader(
                plan_merge(stage, relative_to=relative_to, readers=ChainMap(cache, stages))
            )
        return plan_merge(recipe.final, relative_to=relative_to, readers=ChainMap(cache, stages))
    method = get_method(recipe.merge_method)
    readers = _open_models(recipe, Path(relative_to) if relative_to else None, readers)
    jobs: list[TensorJob] = []
    if recipe.models is not None:
        num_layers = _plan_models(recipe, method, readers, jobs)
    else:
        num_layers = _plan_slices(recipe, method, readers, jobs)
    for job in jobs:
        _check_sources(job, readers)
        labels = [model for model, _ in job.sources]
        problem = method.validate(job.shared, job.per_model, labels) if method.validate else None
        if problem:
            raise EvomergeError(f"tensor {job.out_name}: {problem}")
    first = recipe.base_model or recipe.model_names()[0]
    tok = recipe.tokenizer_source
    if tok == "union":
        raise EvomergeError("tokenizer_source: union is not supported; use base or a model")
    tok_model = first if tok in (None, "base") else tok
    if tok_model not in readers:
        raise EvomergeError(f"tokenizer_source: {tok!r} is not one of the recipe's models")
    return MergePlan(recipe, method, readers, jobs, readers[first].path, readers[tok_model].path, num_layers)


def _split_base(method: MergeMethod, base: str | None, models: list[str], where: str):
    """(base, others) as the method sees them: a method without a base merges it like the rest."""
    if method.base is BasePolicy.NONE:
        others = list(dict.fromkeys(([base] if base else []) + models))
        base = None
    else:
        others = [m for m in models if m != base]
    method.check_models(len(others), base is not None, where)
    return base, others


def _plan_models(recipe, method, readers, jobs) -> int:
    entries = {m.model: m.parameters for m in recipe.models}
    base, others = _split_base(method, recipe.base_model, list(entries), "models")
    reference_name = recipe.base_model or recipe.models[0].model
    reference = readers[reference_name]
    n = reference.num_layers
    for m in entries:  # whole models merge layer by layer: the counts must agree (as mergekit)
        if readers[m].num_layers != n:
            raise EvomergeError(
                f"model {m} has {readers[m].num_layers} layers and {reference_name} has {n}: "
                "models: merges need the same number of layers (use slices: to pick layer ranges)"
            )
    for name in reference.names:
        layer = locate(name).layer
        t = _depth(layer, n) if layer is not None else 0.0
        shared, per_model = resolve_all(
            recipe.merge_method,
            name,
            t,
            [recipe.parameters],
            [[entries.get(m), recipe.parameters] for m in others],
            others,
        )
        jobs.append(
            TensorJob(name, (base, name) if base else None, [(m, name) for m in others], shared, per_model)
        )
    return n


def _plan_slices(recipe, method, readers, jobs) -> int:
    out_layer = 0
    slices = recipe.slices
    for si, sl in enumerate(slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise EvomergeError(f"slices[{si}]: all sources must span the same number of layers")
        base_name = sl.base_model or recipe.base_model
        models = [s.model for s in sl.sources]
        if base_name and method.base is not BasePolicy.NONE and base_name not in models:
            raise EvomergeError(f"slices[{si}]: base_model {base_name} must be one of the slice's sources")
        base, others = _split_base(method, base_name, models, f"slices[{si}]")
        src = {s.model: s for s in sl.sources}
        for s in sl.sources:
            if s.layer_range[1] > readers[s.model].num_layers:
                raise EvomergeError(
                    f"slices[{si}]: layer_range {list(s.layer_range)} of {s.model} exceeds its "
                    f"{readers[s.model].num_layers} layers"
                )
        count = lengths.pop()
        first = readers[sl.sources[0].model]
        for offset in range(count):
            t = _depth(offset, count)
            layer_names = [n for n in first.names if locate(n).layer == sl.sources[0].layer_range[0] + offset]
            for name in layer_names:
                out = with_layer(name, out_layer)

                def at(model, name=name, offset=offset, src=src):
                    return (model, with_layer(name, src[model].layer_range[0] + offset))

                shared, per_model = resolve_all(
                    recipe.merge_method,
                    out,
                    t,
                    [sl.parameters, recipe.parameters],
                    [[src[m].parameters, sl.parameters, recipe.parameters] for m in others],
                    others,
                    [at(m)[1] for m in others],
                )
                jobs.append(
                    TensorJob(out, at(base) if base else None, [at(m) for m in others], shared, per_model)
                )
            out_layer += 1
    # Embeddings from the first slice's models, final norm and head from the last one's, at t=0.
    outside = [n for n in readers[slices[0].sources[0].model].names if locate(n).layer is None]
    for name in outside:
        sl = slices[0] if locate(name).block is Block.EMBEDDING else slices[-1]
        base_name = sl.base_model or recipe.base_model
        base, others = _split_base(method, base_name, [s.model for s in sl.sources], "slices")
        params: dict[str, Parameters | None] = {s.model: s.parameters for s in sl.sources}
        shared, per_model = resolve_all(
            recipe.merge_method,
            name,
            0.0,
            [sl.parameters, recipe.parameters],
            [[params[m], sl.parameters, recipe.parameters] for m in others],
            others,
        )
        jobs.append(
            TensorJob(name, (base, name) if base else None, [(m, name) for m in others], shared, per_model)
        )
    return out_layer


def _check_sources(job: TensorJob, readers: dict[str, TensorSource]) -> None:
    inputs = ([job.base] if job.base else []) + job.sources
    shapes = {}
    for model, name in inputs:
        if name not in readers[model]:
            raise EvomergeError(f"model {model}: tensor {name!r} is missing (needed for {job.out_name})")
        shapes[model] = readers[model].info(name).shape
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{m} {list(s)}" for m, s in shapes.items())
        raise EvomergeError(f"tensor {job.out_name}: shapes differ: {listing}")


# -- execution ------------------------------------------------------------------------------


class Sink(Protocol):
    """Takes each merged tensor. A sink that owns a tensor for each output may also have
    ``destination(name) -> tensor | None``: the merge then writes straight into that tensor
    where it can, and passes that very tensor to ``__call__`` (see :class:`ModelSink`)."""

    def __call__(self, name: str, tensor: torch.Tensor) -> None: ...


def tensor_seed(seed: int, name: str) -> int:
    """Seed of one tensor's random draws: independent of merge order and device count."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def execute(
    plan: MergePlan,
    sink: Sink,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Merge every tensor of the plan and pass it to ``sink(name, tensor)``."""
    device = torch.device(device)
    destination = getattr(sink, "destination", None)
    for i, job in enumerate(plan.jobs):
        out = destination(job.out_name) if destination else None
        sink(job.out_name, merge_job(plan, job, device, out=out))
        if progress:
            progress(i + 1, len(plan.jobs))


def merge_job(
    plan: MergePlan, job: TensorJob, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One output tensor of the plan, computed on ``device``. Where the method's result is
    elementwise and ``out`` has the result's shape, dtype and device (and is contiguous), it is
    written into ``out`` and ``out`` is returned; otherwise a new tensor."""
    recipe = plan.recipe
    compute = TORCH_DTYPES.get(recipe.dtype) if recipe.dtype else None
    out_dtype = TORCH_DTYPES.get(recipe.out_dtype or recipe.dtype or "") or None

    def load(ref):
        model, name = ref
        reader = plan.readers[model]
        if isinstance(reader, StageReader):
            reader.device = device
        x = reader.get(name).to(device, non_blocking=True)
        return x.to(compute) if compute is not None and x.is_floating_point() else x

    base = load(job.base) if job.base else None
    tensors = [load(ref) for ref in job.sources]
    original = (base if base is not None else tensors[0]).dtype
    generator = None
    if plan.method.stochastic:
        generator = torch.Generator(device=device).manual_seed(
            tensor_seed(recipe.evomerge.seed, job.out_name)
        )
    with torch.no_grad():
        merged = plan.method.fn(base, tensors, job.per_model, job.shared, generator)
        if isinstance(merged, Elementwise):  # evaluated block by block into the output dtype
            dtype = out_dtype or original
            first = merged.inputs[0]
            fits = (
                out is not None
                and out.is_contiguous()
                and (out.shape, out.dtype, out.device) == (first.shape, dtype, first.device)
            )
            return merged.materialize(dtype, out if fits else None)
    return merged.to(out_dtype or original)


class StageReader(TensorSource):
    """A stage of a staged recipe seen as a checkpoint: names, shapes and dtypes from its plan,
    and each tensor merged when it is asked for (nothing of the stage is ever stored)."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.path = plan.metadata_source  # config and tokenizer files come from there
        self.config = plan.readers[plan.recipe.base_model or plan.recipe.model_names()[0]].config
        self.device = torch.device("cpu")
        self._jobs = {job.out_name: job for job in plan.jobs}
        self._infos = {n: TensorInfo(n, shape, dtype, "") for n, shape, dtype in output_layout(plan)}

    def get(self, name: str) -> torch.Tensor:
        return merge_job(self.plan, self._jobs[name], self.device)


def output_layout(plan: MergePlan) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of every output tensor, in the order :func:`execute` makes them."""
    r = plan.recipe
    cast = TORCH_DTYPES.get(r.out_dtype or r.dtype or "")
    layout = []
    for job in plan.jobs:
        model, name = job.base or job.sources[0]
        info = plan.readers[model].info(name)
        floating = info.dtype.is_floating_point
        layout.append((job.out_name, info.shape, cast if cast is not None and floating else info.dtype))
    return layout


def _recipe(recipe: Recipe | str | Path) -> tuple[Recipe, Path | None]:
    if isinstance(recipe, (MergeRecipe, StagedRecipe)):
        return recipe, None
    return load_recipe(recipe), Path(recipe).resolve().parent


def merge(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    relative_to: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    direct_io: bool = True,
) -> Path:
    """Merge into a new checkpoint directory (atomic: complete or absent). Relative model
    paths that do not exist from the current directory are looked up in ``relative_to``
    (default: the recipe file's folder). ``direct_io``: see :class:`CheckpointWriter`."""
    recipe, folder = _recipe(recipe)
    folder = Path(relative_to) if relative_to else folder
    plan = plan_merge(recipe, relative_to=folder)
    top = plan.recipe  # the final recipe of a staged one
    updates = {"dtype": top.out_dtype or top.dtype} if (top.out_dtype or top.dtype) else {}
    if plan.num_layers and "num_hidden_layers" in plan.readers[top.model_names()[0]].config:
        updates["num_hidden_layers"] = plan.num_layers
    kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    kwargs["layout"] = output_layout(plan)
    with CheckpointWriter(
        out_dir,
        metadata_from=plan.metadata_source,
        tokenizer_from=plan.tokenizer_source,
        config_updates=updates,
        overwrite=overwrite,
        direct_io=direct_io,
        **kwargs,
    ) as writer:
        execute(plan, writer.add, device=device, progress=progress)
    return Path(out_dir)


def merge_to_state_dict(recipe: Recipe | str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    recipe, folder = _recipe(recipe)
    out: dict[str, torch.Tensor] = {}
    execute(plan_merge(recipe, relative_to=folder), out.__setitem__, device=device)
    return out


class ModelSink:
    """Writes merged tensors into a resident model's parameters in place (no reallocation):
    elementwise methods write straight into them, the others are copied in."""

    def __init__(self, model: torch.nn.Module):
        self.targets = dict(model.named_parameters())
        self.targets.update(dict(model.named_buffers()))
        self.written: set[str] = set()

    def check(self, name: str, shape) -> torch.Tensor:
        """The parameter that output ``name`` of ``shape`` goes to, or a clear error."""
        target = self.targets.get(name)
        if target is None:
            raise EvomergeError(f"the resident model has no parameter {name!r}")
        if tuple(target.shape) != tuple(shape):
            raise EvomergeError(f"{name}: merged shape {list(shape)} != model's {list(target.shape)}")
        return target

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        target = self.check(name, tensor.shape)
        if tensor is not target:  # (merged straight into it otherwise)
            with torch.no_grad():
                target.copy_(tensor)
        self.written.add(name)

    def destination(self, name: str) -> torch.Tensor | None:
        return self.targets.get(name)


def merge_into_model(
    recipe: Recipe | str | Path,
    model: torch.nn.Module,
    *,
    readers: dict[str, TensorSource] | None = None,
) -> MergePlan:
    """Merge straight into ``model``'s parameters on their device, in place; see
    :func:`plan_merge` for ``readers``."""
    recipe, folder = _recipe(recipe)
    plan = plan_merge(recipe, relative_to=folder, readers=readers)
    sink = ModelSink(model)
    for name, shape, _ in output_layout(plan):  # all checked before any parameter is overwritten
        sink.check(name, shape)
    device = next(model.parameters()).device
    execute(plan, sink, device=device)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(
        dict(model.named_parameters())
    )
    missing = set(dict(model.named_parameters())) - sink.written - tied
    if missing:
        raise EvomergeError(f"the recipe left {len(missing)} parameters unset, e.g. {sorted(missing)[0]}")
    return plan
