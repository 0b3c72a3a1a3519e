"""The run ledger: every evaluation as a trial of an Optuna study in ``RUN/study.db``.

Whatever optimizer proposed it, a trial holds the genes as params (numeric genes in [0, 1]),
the objectives as values (or the FAIL state), and as user attributes the per-task metrics,
the recipe digest, seconds spent merging and evaluating, and the error. `optuna-dashboard
sqlite:///RUN/study.db` and `optuna.load_study` read it as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from evomerge.errors import EvomergeError
from evomerge.space import Genome, SearchSpace

STUDY = "evomerge"


class Ledger:
    def __init__(
        self,
        run_dir: Path,
        space: SearchSpace | None = None,
        n_objectives: int = 1,
        storage: str | None = None,
    ):
        """Open (or create) the ledger of a run; without a space it is read-only. ``storage``:
        any Optuna storage URL instead of ``RUN/study.db``; the study is then named
        ``evomerge/<run directory name>``, so one database can hold many runs."""
        optuna.logging.set_verbosity(logging.WARNING)
        self.url = storage or f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"
        self.name = f"{STUDY}/{Path(run_dir).resolve().name}" if storage else STUDY
        if space is None:
            try:
                self.study = optuna.load_study(study_name=self.name, storage=self.url)
            except KeyError:
                raise EvomergeError(f"{self.url}: holds no study {self.name!r}") from None
            return
        self.study = optuna.create_study(
            study_name=self.name,
            storage=self.url,
            directions=["maximize"] * n_objectives,
            load_if_exists=True,
        )
        self.distributions = {
            g.name: CategoricalDistribution(list(g.choices)) if g.categorical else FloatDistribution(0.0, 1.0)
            for g in space.genes
        }

    def record(self, genome: Genome, objectives: list[float] | None, attrs: dict) -> None:
        trial = optuna.trial.create_trial(
            params={k: genome[k] for k in self.distributions},
            distributions=self.distributions,
            values=objectives,
            state=TrialState.COMPLETE if objectives is not None else TrialState.FAIL,
            user_attrs=attrs,
        )
        self.study.add_trial(trial)

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def best(self) -> optuna.trial.FrozenTrial | None:
        done = [t for t in self.trials() if t.state == TrialState.COMPLETE]
        return max(done, key=lambda t: t.values[0]) if done else None
