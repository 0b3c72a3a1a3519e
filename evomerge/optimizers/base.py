"""One ask/tell interface over every optimizer backend. Objectives are maximized."""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass

from evomerge.space import Genome, SearchSpace


@dataclass(frozen=True)
class Proposal:
    id: int
    genome: Genome


class Optimizer(ABC):
    """``ask(n)`` proposes up to n genomes; ``tell(id, objectives)`` reports one (None: the
    candidate failed and counts as the worst score); ``state()``/``restore()`` for resume."""

    name: str

    def __init__(self, space: SearchSpace, seed: int, n_objectives: int = 1):
        self.space, self.seed, self.n_objectives = space, seed, n_objectives

    @abstractmethod
    def ask(self, n: int = 1) -> list[Proposal]: ...

    @abstractmethod
    def tell(self, proposal_id: int, objectives: list[float] | None) -> None: ...

    def state(self) -> bytes:
        return pickle.dumps(self.__dict__)

    def restore(self, state: bytes) -> None:
        self.__dict__.update(pickle.loads(state))  # noqa: S301 (our own state file)
