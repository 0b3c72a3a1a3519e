"""pycma's CMA-ES over the unit cube of numeric genes, with IPOP restarts."""

from __future__ import annotations

import cma
import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optimizers.base import Optimizer, Proposal


class CMAOptimizer(Optimizer):
    """CMA-ES (Hansen). A generation is handed out as it is asked for; the next generation
    starts when every member of the current one has been told. Failures are told as worse
    than the worst score seen so far. With ``restarts``, a converged run restarts with a
    doubled population (IPOP)."""

    name = "cma"

    def __init__(
        self,
        space,
        seed: int,
        n_objectives: int = 1,
        *,
        sigma0: float = 1 / 6,
        popsize: int | None = None,
        restarts: int = 0,
        **options,
    ):
        super().__init__(
            space, seed, n_objectives, sigma0=sigma0, popsize=popsize, restarts=restarts, **options
        )
        if n_objectives != 1:
            raise EvomergeError("optimizer cma optimizes one objective; use nsga2 for several")
        categorical = [g.name for g in space.genes if g.categorical]
        if categorical:
            raise EvomergeError(
                f"optimizer cma cannot search categorical gene {categorical[0]!r}; use tpe, nsga2 or random"
            )
        self.names = [g.name for g in space.genes]
        x0 = [float(space.initial()[n]) for n in self.names]
        self.sigma0, self.restarts_left, self.cma_options = sigma0, restarts, options
        self.popsize = popsize or 4 + int(3 * np.log(len(self.names)))
        self._start(x0, self.popsize, seed)
        self.next_id = 0
        self.worst = None

    def _start(self, x0, popsize, seed):
        opts = {"bounds": [0, 1], "popsize": popsize, "seed": seed + 1, "verbose": -9, **self.cma_options}
        self.es = cma.CMAEvolutionStrategy(x0, self.sigma0, opts)
        self._new_generation()

    def _new_generation(self):
        self.generation = self.es.ask()
        self.pending = list(range(len(self.generation)))  # members not handed out yet
        self.results: dict[int, float] = {}
        self.ids: dict[int, int] = {}  # proposal id -> member index

    def _ask(self, n: int) -> list[Proposal]:
        out = []
        while len(out) < n and self.pending:
            member = self.pending.pop(0)
            pid = self.next_id
            self.next_id += 1
            self.ids[pid] = member
            x = np.clip(self.generation[member], 0, 1)
            out.append(Proposal(pid, dict(zip(self.names, map(float, x), strict=True))))
        return out

    def _tell(self, proposal_id: int, objectives: list[float] | None) -> None:
        member = self.ids.pop(proposal_id)
        if objectives is None:
            loss = None
        else:
            loss = -float(objectives[0])
            self.worst = loss if self.worst is None else max(self.worst, loss)
        self.results[member] = loss
        if len(self.results) == len(self.generation):
            penalty = (self.worst if self.worst is not None else 0.0) + 1.0
            losses = [
                penalty if self.results[i] is None else self.results[i] for i in range(len(self.generation))
            ]
            self.es.tell(self.generation, losses)
            if self.es.stop() and self.restarts_left > 0:
                self.restarts_left -= 1
                self.popsize *= 2
                self._start(
                    list(self.es.result.xbest), self.popsize, self.seed + 1000 * (self.restarts_left + 1)
                )
            else:
                self._new_generation()

    @property
    def waiting(self) -> int:
        """Members handed out but not told: ask() returns nothing until they are."""
        return len(self.ids)
