"""pycma's CMA-ES over the unit cube of numeric genes, with IPOP restarts."""

from __future__ import annotations

import cma
import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optimizers.base import Optimizer, Proposal


class CMAOptimizer(Optimizer):
    """CMA-ES (Hansen). Workers are never starved: once the generation's ``popsize`` members
    are out, further asks draw extra members from the same distribution, and the distribution
    is updated from the first ``popsize`` results to come back (members of one generation are
    exchangeable samples, so any ``popsize`` of them make a valid CMA-ES step; this is also how
    Optuna's CmaEsSampler runs asynchronously). A result that arrives after its generation was
    updated is late: it is recorded and can be the best, but does not move the distribution.
    Failures are told as worse than the worst score seen so far. With ``restarts``, a
    converged run restarts with a doubled population (IPOP). Sampling uses its own seeded
    generator, never numpy's global one."""

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
        self.generation_number = 0  # counts across restarts
        self.ids: dict[int, tuple[int, int]] = {}  # proposal id -> (generation number, member)
        self._start(x0, self.popsize, seed)
        self.next_id = 0
        self.worst = None
        self.late = 0  # results that came back after their generation was updated

    def _start(self, x0, popsize, seed):
        rng = np.random.default_rng(seed + 1)
        opts = {"bounds": [0, 1], "popsize": popsize, "verbose": -9,
                "randn": lambda *shape: rng.standard_normal(shape), **self.cma_options}  # fmt: skip
        self.es = cma.CMAEvolutionStrategy(x0, self.sigma0, opts)
        self._new_generation()

    def _new_generation(self):
        self.generation_number += 1
        self.generation = self.es.ask()
        self.pending = list(range(len(self.generation)))  # members not handed out yet
        self.results: dict[int, float | None] = {}  # member -> loss, in the order they came back

    def _ask(self, n: int) -> list[Proposal]:
        out = []
        for _ in range(n):
            if self.pending:
                member = self.pending.pop(0)
            else:  # all members are out: an extra one from the same distribution
                self.generation.append(self.es.ask(1)[0])
                member = len(self.generation) - 1
            pid = self.next_id
            self.next_id += 1
            self.ids[pid] = (self.generation_number, member)
            x = np.clip(self.generation[member], 0, 1)
            out.append(Proposal(pid, dict(zip(self.names, map(float, x), strict=True))))
        return out

    def _tell(self, proposal_id: int, objectives: list[float] | None) -> None:
        generation, member = self.ids.pop(proposal_id)
        if objectives is None:
            loss = None
        else:
            loss = -float(objectives[0])
            self.worst = loss if self.worst is None else max(self.worst, loss)
        if generation != self.generation_number:
            self.late += 1
            return
        self.results[member] = loss
        if len(self.results) == self.popsize:
            penalty = (self.worst if self.worst is not None else 0.0) + 1.0
            members = list(self.results)
            losses = [penalty if self.results[i] is None else self.results[i] for i in members]
            self.es.tell([self.generation[i] for i in members], losses)
            if self.es.stop() and self.restarts_left > 0:
                self.restarts_left -= 1
                self.popsize *= 2
                self._start(
                    list(self.es.result.xbest), self.popsize, self.seed + 1000 * (self.restarts_left + 1)
                )
            else:
                self._new_generation()
