"""`cnnkit tune`'s sampler: Optuna's TPE, seeded afresh for each trial by its number in the study.

Written here, not taken as it is, because a sampler is seeded once, in its process: processes
that opened one new study at the same moment (`--storage postgresql://...` on several machines, or
several processes on one SQLite file) seeded their TPE alike and drew the same settings for their
first trials (TPE's first ten are random draws), so two machines ran the same trials; and a study
continued by the same command drew its first trials' settings again (until a seed past the trials
the study held was added for that alone). The storage hands out each trial's number once, so a
TPE seeded by `seed + number` draws settings of the trial's own wherever it runs, while one
process's study is still reproducible from `--seed`. All the sampling is Optuna's: this class
only chooses the seed and passes every call on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna import Study
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState


class TrialSeededTPE(BaseSampler):
    """A TPESampler(seed=seed + trial number) for each trial, made as Optuna opens the trial."""

    def __init__(self, seed: int):
        self.seed = seed
        self.tpe_sampler = TPESampler(seed=seed)  # until the first trial opens (reseed_rng may come first)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.tpe_sampler = TPESampler(seed=self.seed + trial.number)
        self.tpe_sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.tpe_sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.tpe_sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.tpe_sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.tpe_sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe_sampler.reseed_rng()
