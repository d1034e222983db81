"""What a running trial writes, and how the study's trials are counted, in few round trips.

Optuna commits each `suggest_*`, `set_user_attr` and `report` on its own, and reads every
trial of a study in one query per relation (trials, params, values, attributes, reports):
each a few round trips, on PostgreSQL the larger part of the service's cost per trial
(benchmarks/trial_overhead.py). Here a trial's params, user attributes and reports reach
the database in one transaction per group, and "how many trials" is one COUNT. Each falls
back to Optuna's own calls for anything that is not an RDB storage (a FixedTrial, an
in-memory study) or an Optuna whose internals moved.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3

import optuna
from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite

try:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError:  # pragma: no cover - an Optuna that moved them: one call each
    models = _create_scoped_session = None

# INSERT ... ON CONFLICT DO UPDATE, where the dialect has it (as Optuna's attribute writes)
_UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_RDB_PRIVATES = ("_set_trial_attr_without_commit", "_set_trial_intermediate_value_without_commit",
                 "_set_trial_param_without_commit")


def _rdb(store) -> optuna.storages.RDBStorage | None:
    """The RDB storage under Optuna's cache wrapper, when its privates used here are there."""
    rdb = getattr(store, "_backend", store)
    if (not isinstance(rdb, optuna.storages.RDBStorage) or _create_scoped_session is None
            or not all(hasattr(rdb, name) for name in _RDB_PRIVATES)):
        return None
    return rdb


def count_trials(study: optuna.Study) -> int:
    """How many trials `study` holds, in any state: one COUNT on an RDB storage."""
    rdb = _rdb(study._storage)
    if rdb is None:
        return len(study.get_trials(deepcopy=False))
    with _create_scoped_session(rdb.scoped_session) as session:
        return session.query(func.count(models.TrialModel.trial_id)).filter(
            models.TrialModel.study_id == study._study_id).scalar()


class _ParamsLater:
    """`trial.storage` while the trial suggests its params (params_later): each param waits
    in `pending` instead of a commit of its own. Any other use of it (the trial's attributes,
    reports, pruning, reading itself back) writes them first, one by one. Other processes
    see the running trial's params a few milliseconds later than with Optuna alone (until
    its first write): their TPE (constant liar) treats it meanwhile as a trial that has
    not suggested them yet."""

    def __init__(self, inner, trial_id: int) -> None:
        self._inner, self._trial_id = inner, trial_id
        self.pending: list[tuple[str, float, optuna.distributions.BaseDistribution]] = []

    def set_trial_param(self, trial_id, param_name, param_value_internal, distribution):
        if trial_id != self._trial_id:
            self.flush()
            return self._inner.set_trial_param(trial_id, param_name, param_value_internal,
                                               distribution)
        self.pending.append((param_name, param_value_internal, distribution))
        return None

    def take(self) -> list:
        pending, self.pending = self.pending, []
        return pending

    def flush(self) -> None:
        for name, value, distribution in self.take():
            self._inner.set_trial_param(self._trial_id, name, value, distribution)

    def __getattr__(self, name: str):
        self.flush()
        return getattr(self._inner, name)


@contextlib.contextmanager
def params_later(trial):
    """Within this block, `trial`'s suggested params reach the database with its next
    write_trial, in that one transaction, instead of one commit per suggest (10 per mlp
    trial); whatever is still waiting at the block's end is written then."""
    inner = getattr(trial, "storage", None)
    if _rdb(inner) is None or getattr(trial, "_trial_id", None) is None:
        yield
        return
    later = trial.storage = _ParamsLater(inner, trial._trial_id)
    try:
        yield
    finally:
        trial.storage = inner
        later.flush()


def _known_distribution(store, trial_id: int, name: str):
    """The distribution Optuna's cache wrapper holds for param `name` of the trial's study,
    so the write need not query an earlier trial's; None when it holds none."""
    try:
        study_id, _ = store._trial_id_to_study_id_and_number[trial_id]
        return study_id, store._studies[study_id].param_distribution.get(name)
    except (AttributeError, KeyError):
        return None, None


def write_trial(trial, user_attrs: dict | None = None,
                reports: dict[int, float] | None = None) -> None:
    """Several user attributes and intermediate values (step -> value) of a running
    optuna.Trial, and the params it suggested within params_later, in one transaction of its
    RDB storage. The trial sees them as if set one by one (`trial.user_attrs`, and its pruner
    the reports). Anything else goes through `set_user_attr` and `report` one at a time."""
    user_attrs, reports = user_attrs or {}, reports or {}
    later = trial.storage if isinstance(getattr(trial, "storage", None), _ParamsLater) else None
    params = later.take() if later is not None else []
    store = later._inner if later is not None else getattr(trial, "storage", None)
    if not user_attrs and not reports and not params:
        return
    rdb = _rdb(store)
    cached = getattr(trial, "_cached_frozen_trial", None)
    trial_id = getattr(trial, "_trial_id", None)
    if rdb is None or cached is None or trial_id is None:
        for name, value, distribution in params:  # not reached: params_later needs an RDB
            store.set_trial_param(trial_id, name, value, distribution)
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        for step, value in sorted(reports.items()):
            study = getattr(trial, "study", None)  # a FixedTrial has none
            if study is None or len(study.directions) == 1:
                trial.report(value, step)
            else:  # Trial.report refuses several objectives; the storage takes the value
                store.set_trial_intermediate_value(trial_id, step, value)
        return
    fresh = {int(step): float(value) for step, value in reports.items()
             if int(step) not in cached.intermediate_values}  # report() ignores a repeat too
    known = {name: _known_distribution(store, trial_id, name) for name, _, _ in params}
    with _create_scoped_session(rdb.scoped_session) as session:  # an error is raised
        _write(rdb, session, trial_id, [(*p, known[p[0]][1]) for p in params], user_attrs,
               fresh)
    for name, _, distribution in params:  # as Optuna's cache wrapper keeps after a write
        study_id, previous = known[name]
        if study_id is not None and previous is None:
            store._studies[study_id].param_distribution[name] = distribution
    cached.user_attrs.update(user_attrs)
    cached.intermediate_values.update(fresh)


def _write(rdb, session, trial_id: int, params: list, user_attrs: dict,
           reports: dict[int, float]) -> None:
    """What write_trial writes, in a few statements: Optuna's own `*_without_commit` calls
    read the trial once per item (and an attribute's or report's earlier row), each a round
    trip. Here the trial is read once, params and reports are inserted (a report is new:
    write_trial wrote no earlier one, and only this process writes a running trial's), and
    the attributes are upserted in one statement."""
    trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
    rdb.check_trial_is_updatable(trial_id, trial.state)
    for name, value, distribution, previous in params:
        if previous is None:  # Optuna reads the study's earlier distribution of `name`
            rdb._set_trial_param_without_commit(session, trial_id, name, value, distribution)
            continue
        optuna.distributions.check_distribution_compatibility(previous, distribution)
        session.add(models.TrialParamModel(
            trial_id=trial_id, param_name=name, param_value=value,
            distribution_json=optuna.distributions.distribution_to_json(distribution)))
    for step, value in sorted(reports.items()):
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(
            value)
        session.add(models.TrialIntermediateValueModel(
            trial_id=trial_id, step=step, intermediate_value=stored,
            intermediate_value_type=kind))
    upsert = _UPSERTS.get(rdb.engine.name)
    if upsert is None or (rdb.engine.name == "sqlite" and sqlite3.sqlite_version_info < (3, 24)):
        for key, value in user_attrs.items():
            rdb._set_trial_attr_without_commit(session, models.TrialUserAttributeModel,
                                               trial_id, key, value)
        return
    if user_attrs:
        table = models.TrialUserAttributeModel
        insert = upsert(table).values([{"trial_id": trial_id, "key": key,
                                        "value_json": json.dumps(value)}
                                       for key, value in user_attrs.items()])
        session.execute(insert.on_conflict_do_update(
            index_elements=[table.trial_id, table.key],
            set_={"value_json": insert.excluded.value_json}))
