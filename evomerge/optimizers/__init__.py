"""Optimizers behind one ask/tell interface (see :class:`Optimizer`).

>>> opt = make_optimizer("cma", space, seed=0)
>>> for p in opt.ask(4): opt.tell(p.id, [score(space.decode(p.genome))])
"""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.optimizers.base import Optimizer, Proposal
from evomerge.space import SearchSpace

OPTIMIZERS = ("cma", "tpe", "optuna-cmaes", "nsga2", "gp", "random", "qmc")

__all__ = ["OPTIMIZERS", "Optimizer", "Proposal", "make_optimizer"]


def make_optimizer(
    name: str, space: SearchSpace, seed: int = 0, n_objectives: int = 1, **options
) -> Optimizer:
    if name == "cma":
        from evomerge.optimizers.cma_backend import CMAOptimizer

        return CMAOptimizer(space, seed, n_objectives, **options)
    if name in OPTIMIZERS:
        from evomerge.optimizers.optuna_backend import OptunaOptimizer

        return OptunaOptimizer(space, seed, n_objectives, sampler=name, **options)
    raise EvomergeError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
