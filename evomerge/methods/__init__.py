"""Merge methods as pure tensor functions, registered by the names mergekit uses.

>>> from evomerge.methods import get_method
>>> ties = get_method("ties")
>>> [p.name for p in ties.params]
"""

from evomerge.methods import linear, model_stock, sce, spherical, task_vectors  # noqa: F401  (register)
from evomerge.methods.registry import (
    METHODS,
    BasePolicy,
    MergeMethod,
    Param,
    Scope,
    get_method,
    merge_tensors,
)

__all__ = ["METHODS", "BasePolicy", "MergeMethod", "Param", "Scope", "get_method", "merge_tensors"]
