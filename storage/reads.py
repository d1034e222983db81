"""How the study's trials are read back: the same FrozenTrials as Optuna's RDBStorage, from a
few plain SELECTs instead of its ORM.

Optuna's RDBStorage builds each trial it reads from ORM objects: a read of one running
trial costs 5-7 ms on PostgreSQL, most of it in SQLAlchemy's ORM rather than on the server
(six statements at 0.2 ms a round trip here). A trial in a study of 1,000 reads trials
about seven times (the trial itself three times, the study's unfinished and new trials at
ask, at its first suggestion and at each pruning rung: benchmarks/trial_overhead.py), and a
process that opens a study of 1,000 trials reads all of them once (0.9 s through the ORM).
CoreReadStorage reads the same rows with SQLAlchemy Core, the trials first and then each
related table for those trial ids, and builds the FrozenTrials itself; tests/test_storage.py
holds it equal to Optuna's own read for trials of every state, distribution and value kind.
Everything else (writes, studies, heartbeats) is Optuna's. With an Optuna whose tables or
privates moved, the reads are Optuna's too. storage.open uses it for server databases only:
on SQLite, where every transaction here takes the write lock, a read on a connection of its
own beside Optuna's session stalled a worker in a test now and then (storage.open).
"""

from __future__ import annotations

import datetime
import functools
import json

import optuna
import sqlalchemy
from sqlalchemy import exc as sqlalchemy_exc

try:
    from optuna.storages._rdb import models
except ImportError:  # pragma: no cover - an Optuna that moved them: its own reads
    models = None

CHUNK = 500  # trial ids per IN (...): SQLite's oldest variable limit is 999

# the tables a trial's params, values, user and system attributes and reports are in (read
# in this order by _read), each with its primary key: the order Optuna's rows come in
_RELATED = (("TrialParamModel", "param_id"), ("TrialValueModel", "trial_value_id"),
            ("TrialUserAttributeModel", "trial_user_attribute_id"),
            ("TrialSystemAttributeModel", "trial_system_attribute_id"),
            ("TrialIntermediateValueModel", "trial_intermediate_value_id"))


def _tables():
    """(trials table, [(related table, its primary key column)]), or None when Optuna's
    models are not the ones this module reads."""
    try:
        trials = models.TrialModel.__table__
        related = [(getattr(models, name).__table__, key) for name, key in _RELATED]
        for table, key in related:
            table.c[key], table.c.trial_id  # noqa: B018 (a missing column raises here)
        models.TrialValueModel.stored_repr_to_value  # noqa: B018
        models.TrialIntermediateValueModel.stored_repr_to_intermediate_value  # noqa: B018
        models.TrialModel._datetime_start_utc  # noqa: B018 (stored as naive UTC)
        models.StudyModel.__table__.c.study_id, models.NOT_FOUND_MSG  # noqa: B018
        attrs = models.StudyUserAttributeModel.__table__
        attrs.c.study_id, attrs.c.key, attrs.c.value_json  # noqa: B018
        for name in ("number", "state", "datetime_start", "datetime_complete", "study_id"):
            trials.c[name]  # noqa: B018
    except (AttributeError, KeyError):
        return None
    return trials, related


_TABLES = _tables() if models is not None else None


@functools.lru_cache(maxsize=4096)
def _distribution(text: str) -> optuna.distributions.BaseDistribution:
    """One object per distinct JSON: a study's trials share a handful of distributions,
    and Optuna treats them as values (none is changed after it is made)."""
    return optuna.distributions.json_to_distribution(text)


def _local(stored: datetime.datetime | None) -> datetime.datetime | None:
    """As Optuna's TrialModel shows a stored naive-UTC time: naive local time."""
    if stored is None:
        return None
    return stored.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)


def _read(connection, where) -> list[optuna.trial.FrozenTrial]:
    trials_table, related = _TABLES
    columns = [trials_table.c[name] for name in
               ("trial_id", "number", "state", "datetime_start", "datetime_complete")]
    rows = connection.execute(sqlalchemy.select(*columns).where(where)
                              .order_by(trials_table.c.trial_id)).all()
    parts = {row.trial_id: ({}, {}, {}, {}, {}, {}) for row in rows}
    ids = list(parts)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        found = [connection.execute(sqlalchemy.select(table).where(table.c.trial_id.in_(chunk))
                                    .order_by(table.c[key])).all() for table, key in related]
        params_rows, value_rows, user_rows, system_rows, step_rows = found
        for row in params_rows:
            params, distributions = parts[row.trial_id][:2]
            distribution = _distribution(row.distribution_json)
            params[row.param_name] = distribution.to_external_repr(row.param_value)
            distributions[row.param_name] = distribution
        for row in value_rows:
            parts[row.trial_id][2][row.objective] = models.TrialValueModel.stored_repr_to_value(
                row.value, row.value_type)
        for row in user_rows:
            parts[row.trial_id][3][row.key] = json.loads(row.value_json)
        for row in system_rows:
            parts[row.trial_id][4][row.key] = json.loads(row.value_json)
        stored = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
        for row in step_rows:
            parts[row.trial_id][5][row.step] = stored(row.intermediate_value,
                                                      row.intermediate_value_type)
    trials = []
    for row in rows:
        params, distributions, values, user_attrs, system_attrs, steps = parts[row.trial_id]
        trials.append(optuna.trial.FrozenTrial(
            number=row.number, state=row.state, value=None,
            values=[values[i] for i in sorted(values)] if values else None,
            datetime_start=_local(row.datetime_start),
            datetime_complete=_local(row.datetime_complete),
            params=params, distributions=distributions, user_attrs=user_attrs,
            system_attrs=system_attrs, intermediate_values=steps, trial_id=row.trial_id))
    return trials


def _study_exists(connection, study_id: int) -> None:
    studies = models.StudyModel.__table__
    if connection.execute(sqlalchemy.select(studies.c.study_id).where(
            studies.c.study_id == study_id)).first() is None:
        raise KeyError(models.NOT_FOUND_MSG)  # as Optuna's find_or_raise_by_id


class CoreReadStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, whose trial reads (`get_trial`, and `_get_trials`, behind
    get_all_trials and Optuna's cache wrapper) and study user attributes (read at every
    trial's start and end for the study-wide budget: search.budget) run as plain SELECTs
    (module doc)."""

    def get_study_user_attrs(self, study_id: int) -> dict:
        if _TABLES is None:
            return super().get_study_user_attrs(study_id)
        table = models.StudyUserAttributeModel.__table__
        with self.engine.connect() as connection:
            _study_exists(connection, study_id)
            rows = connection.execute(sqlalchemy.select(table.c.key, table.c.value_json).where(
                table.c.study_id == study_id)).all()
        return {row.key: json.loads(row.value_json) for row in rows}

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        if _TABLES is None:
            return super().get_trial(trial_id)
        with self.engine.connect() as connection:
            found = _read(connection, _TABLES[0].c.trial_id == trial_id)
        if not found:
            raise KeyError(models.NOT_FOUND_MSG)
        return found[0]

    def _get_trials(self, study_id: int, states, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[optuna.trial.FrozenTrial]:
        if _TABLES is None:
            return super()._get_trials(study_id, states, included_trial_ids,
                                       trial_id_greater_than)
        trials_table = _TABLES[0]
        # Optuna's own conditions, in its order
        included = {i for i in included_trial_ids if i <= trial_id_greater_than}
        where = [trials_table.c.study_id == study_id]
        if states is not None:
            where.append(trials_table.c.state.in_(list(states)))
        newer = trials_table.c.trial_id > trial_id_greater_than
        with self.engine.connect() as connection:
            _study_exists(connection, study_id)
            if included and trial_id_greater_than > -1:
                try:
                    return _read(connection, sqlalchemy.and_(
                        *where, sqlalchemy.or_(trials_table.c.trial_id.in_(included), newer)))
                except sqlalchemy_exc.OperationalError:  # too many ids for one IN, as Optuna
                    connection.rollback()
                    trials = _read(connection, sqlalchemy.and_(*where))
                    return [t for t in trials
                            if t._trial_id in included or t._trial_id > trial_id_greater_than]
            if trial_id_greater_than > -1:
                where.append(newer)
            return _read(connection, sqlalchemy.and_(*where))
