"""Optuna samplers through study.ask()/tell(): tpe, optuna-cmaes, nsga2, gp, random, qmc."""

from __future__ import annotations

import logging

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from evomerge.errors import EvomergeError
from evomerge.optimizers.base import Optimizer, Proposal


def make_sampler(name: str, seed: int, options: dict, categorical: bool):
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **options)
    if name == "optuna-cmaes":
        if categorical:
            raise EvomergeError(
                "optimizer optuna-cmaes cannot search categorical genes; use tpe, nsga2 or random"
            )
        return optuna.samplers.CmaEsSampler(seed=seed, **options)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **options)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **options)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, **{"scramble": True, **options})
    raise EvomergeError(f"unknown optimizer {name!r}")


class OptunaOptimizer(Optimizer):
    """Any Optuna sampler; genes are parameters named as the space names them, numeric genes
    in [0, 1]. Failures are told as FAIL trials, which samplers skip."""

    def __init__(self, space, seed: int, n_objectives: int = 1, *, sampler: str = "tpe", **options):
        super().__init__(space, seed, n_objectives, sampler=sampler, **options)
        self.name = sampler
        categorical = any(g.categorical for g in space.genes)
        optuna.logging.set_verbosity(logging.WARNING)
        self.study = optuna.create_study(
            directions=["maximize"] * n_objectives,
            sampler=make_sampler(sampler, seed, options, categorical),
        )
        self.distributions = {
            g.name: CategoricalDistribution(list(g.choices)) if g.categorical else FloatDistribution(0.0, 1.0)
            for g in space.genes
        }
        self.study.enqueue_trial(space.initial())  # start where the space says is sensible
        self.trials = {}

    def _ask(self, n: int) -> list[Proposal]:
        out = []
        for _ in range(n):
            trial = self.study.ask(self.distributions)
            self.trials[trial.number] = trial
            out.append(Proposal(trial.number, dict(trial.params)))
        return out

    def _tell(self, proposal_id: int, objectives: list[float] | None) -> None:
        trial = self.trials.pop(proposal_id)
        if objectives is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, list(objectives) if self.n_objectives > 1 else float(objectives[0]))
