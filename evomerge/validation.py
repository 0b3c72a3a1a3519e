"""Reading user YAML into pydantic models, with errors that name the file, the key and the fix.

Recipes, search spaces and search configs all go through here, so every one of them reports
a mistake the same way: ``FILE: key.path: what is wrong`` (an unknown key also suggests the
closest valid one).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import EvomergeError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path, what: str) -> dict:
    """The mapping in a YAML file; ``what`` names the kind of file in errors."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise EvomergeError(f"{path}: cannot read {what} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise EvomergeError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{path}: a {what} must be a mapping")
    return data


def validate(model: type[M], data: Any, where: str) -> M:
    """``model.model_validate(data)`` with one readable line on failure."""
    try:
        return model.model_validate(data)
    except EvomergeError as e:  # raised by a validator (e.g. an unknown merge method)
        raise EvomergeError(f"{where}: {e}") from None
    except ValidationError as e:
        raise EvomergeError(f"{where}: {explain(e, model)}") from None


def explain(e: ValidationError, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, [str(p) for p in err["loc"][:-1]])
        close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1)
        return f"{key}: unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
    return f"{key}: {err['msg'].removeprefix('Value error, ')}"


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for key in path:
        annotation = getattr(model.model_fields.get(key), "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
