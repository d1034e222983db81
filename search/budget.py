"""How many trials a study may hold, and who runs its final step.

Two budgets, named apart:
- `--n-trials N`: this run adds N trials (one machine, resumed as often as wanted);
- `--max-trials N`: the study's total across every run and machine, kept in the study's
  `max_trials` user attribute, so a machine started with other flags still respects it.

A trial counts once it runs (RUNNING, COMPLETE, PRUNED, FAIL), except a failed trial that
was retried (its retry counts instead) and a trial that started over the budget. Trial
numbers are handed out by the storage in one order, so a trial that starts with
`max_trials` counted trials numbered below it is over the budget, on every machine alike:
the budget is exact, not "stop soon after".

With a study-wide budget, the final step runs once per study: the machine that sees the
budget used and nothing running claims it with one INSERT into Optuna's
study_user_attributes, whose (study, key) unique constraint lets exactly one claim succeed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import optuna
from sqlalchemy.exc import IntegrityError

import storage

log = logging.getLogger(__name__)

_STARTED = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
OVER_BUDGET = "over_budget"  # user attr of a trial that started past --max-trials


def max_trials(study: optuna.Study) -> int | None:
    return study.user_attrs.get("max_trials")


def _counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    return [t for t in trials if t.state in _STARTED and not t.user_attrs.get(OVER_BUDGET)
            and not (t.state == optuna.trial.TrialState.FAIL and t.number in retried)]


def budget_used(study: optuna.Study) -> int:
    """Trials that count towards a budget (see the module doc)."""
    return len(_counted(study.get_trials(deepcopy=False)))


def over_budget(study: optuna.Study, number: int) -> bool:
    """Whether trial `number`, just started, is past the study's --max-trials."""
    limit = max_trials(study)
    if limit is None or number < limit:  # only `number` trials are numbered below it
        return False
    before = [t for t in _counted(study.get_trials(deepcopy=False)) if t.number < number]
    return len(before) >= limit


def remaining(study: optuna.Study) -> int | None:
    limit = max_trials(study)
    return None if limit is None else max(0, limit - budget_used(study))


class StopAtBudget:
    """Callback: stop once the study holds `target` counted trials (this run's --n-trials)
    or its --max-trials."""

    def __init__(self, target: int | None = None) -> None:
        self.target = target

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        limits = [n for n in (self.target, max_trials(study)) if n is not None]
        # counted trials are some of the study's: while it holds fewer than the lowest limit,
        # one COUNT answers, not a read of every trial
        if not limits or storage.count_trials(study) < min(limits):
            return
        used = budget_used(study)
        if any(used >= n for n in limits):
            study.stop()


def claim_final(study: optuna.Study, storage: optuna.storages.BaseStorage) -> bool:
    """Whether this process runs the final step. Always, for a study without --max-trials
    (each run ends with its own final step, as one machine adding trials expects). With one:
    only when the budget is used, no trial is running, and this process wins the claim."""
    limit = max_trials(study)
    if limit is None:
        return True
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    used = len(_counted(trials))
    if used < limit or running:
        log.info("final step: left to the machine that finishes the study's last trial "
                 "(%d of %d trials counted, %d running); or run python -m search.final",
                 used, limit, running)
        return False
    finished = sum(t.state in _STARTED for t in trials)
    key = f"final_claim:{finished}"
    claim = {"host": socket.gethostname(), "pid": os.getpid(),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if _insert_once(storage, study._study_id, key, claim):
        return True
    holder = study.user_attrs.get(key, {})
    log.info("final step: already claimed by %s (pid %s); skipped here",
             holder.get("host", "another machine"), holder.get("pid", "?"))
    return False


def _insert_once(storage, study_id: int, key: str, value: dict) -> bool:
    """Insert a study user attribute only if `key` is not there yet; True if this call did.
    On a storage that is not a database of this process (a grpc:// proxy) the claim is a
    study named <study>:<key>, which the database's unique study names let only one
    machine create; the attribute then says who holds it."""
    from optuna.storages._rdb import models

    rdb = getattr(storage, "_backend", storage)  # under Optuna's _CachedStorage
    if not isinstance(rdb, optuna.storages.RDBStorage):
        name = f"{storage.get_study_name_from_id(study_id)}:{key}"
        try:
            claim_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
        except optuna.exceptions.DuplicatedStudyError:
            return False
        storage.set_study_user_attr(claim_id, "claim_of", value)
        storage.set_study_user_attr(study_id, key, value)
        return True
    session = rdb.scoped_session()
    try:
        session.add(models.StudyUserAttributeModel(study_id=study_id, key=key,
                                                   value_json=json.dumps(value)))
        session.commit()
        return True
    except IntegrityError:
        session.rollback()
        return False
    finally:
        session.close()
