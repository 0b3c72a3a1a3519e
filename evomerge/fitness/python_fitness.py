"""A user's Python fitness: ``package.module:function(model, tokenizer) -> float | dict``."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from evomerge.errors import EvomergeError


def load_callable(target: str) -> Callable:
    """Import ``package.module:function`` (only when a config names it)."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EvomergeError(f"python fitness {target!r}: cannot import {module_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvomergeError(f"python fitness {target!r}: {module_name} has no function {attr!r}")
    return fn


def call(fn: Callable, model, tokenizer) -> dict[str, float]:
    """Run it and check the result: finite numbers, as ``{name: value}``. Any failure is an
    EvomergeError with the reason, which the search records as a failed candidate."""
    try:
        result = fn(model, tokenizer)
    except Exception as e:  # noqa: BLE001 (the user's code: anything can happen)
        raise EvomergeError(f"python fitness raised {type(e).__name__}: {e}") from e
    if isinstance(result, bool) or not isinstance(result, (int, float, dict)):
        raise EvomergeError(
            f"python fitness returned {type(result).__name__}; expected a float or dict of floats"
        )
    values = {"python": result} if not isinstance(result, dict) else dict(result)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvomergeError(f"python fitness value {name!r} is {value!r}, not a finite number")
    return {k: float(v) for k, v in values.items()}
