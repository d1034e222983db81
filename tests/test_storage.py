"""storage.open: URL checks, and several worker processes sharing one study."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from collections import Counter

import optuna
import pytest

import storage
from search.errors import StorageError


@pytest.mark.parametrize("url, message", [
    ("not a url", "malformed"),
    ("nosuchdb://x/y", "unknown database kind"),
    ("sqlite:///missing-dir/studies.db", "directory missing-dir does not exist"),
    ("postgresql://postgres@127.0.0.1:1/test", "cannot open storage"),
])
def test_bad_urls_are_one_clear_line(url, message):
    with pytest.raises(StorageError, match=message) as info:
        storage.open(url)
    assert "\n" not in str(info.value)


def test_password_is_not_shown():
    with pytest.raises(StorageError) as info:
        storage.open("postgresql://user:hunter2@127.0.0.1:1/test")
    assert "hunter2" not in str(info.value)


def test_sqlite_uses_wal_and_heartbeats(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    opened = storage.open(url)
    assert opened.get_heartbeat_interval() == storage.HEARTBEAT_INTERVAL_S
    with sqlite3.connect(tmp_path / "studies.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert storage.sqlite_path(url) == tmp_path / "studies.db"
    assert storage.sqlite_path("sqlite://") is None


def _worker(url: str, name: str, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=name, storage=storage.open(url),
                              sampler=optuna.samplers.RandomSampler())
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=n_trials)


def test_several_processes_share_one_study(storage_url, study_name):
    study = optuna.create_study(storage=storage.open(storage_url), study_name=study_name)
    queued = [0.1 * i for i in range(6)]
    for x in queued:
        study.enqueue_trial({"x": x})
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(storage_url, study_name, 8))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    trials = optuna.load_study(study_name=study_name, storage=storage_url).get_trials()
    assert len(trials) == 24
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    counts = Counter(t.params["x"] for t in trials)
    assert all(counts[x] == 1 for x in queued)  # each queued trial popped exactly once


def _dies_mid_trial(url: str, name: str) -> None:
    import os
    import time

    import sqlalchemy

    opened = storage.open(url, heartbeat_interval=1, grace_period=2)

    def objective(trial):
        trial.suggest_float("x", -1, 1)
        # killed only once its heartbeat is recorded (Optuna's thread records it at once, but
        # a slow machine may take longer than any fixed sleep)
        deadline = time.monotonic() + 120
        query = sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = :i")
        while time.monotonic() < deadline:
            with opened.engine.connect() as connection:
                if connection.execute(query, {"i": trial._trial_id}).scalar():
                    break
            time.sleep(0.1)
        os._exit(1)  # the worker is killed: no exception, no tell

    study = optuna.load_study(study_name=name, storage=opened)
    study.optimize(objective, n_trials=1)


def test_trial_of_a_dead_worker_is_failed_and_retried(storage_url, study_name):
    import time

    opened = storage.open(storage_url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=opened, study_name=study_name)
    worker = multiprocessing.get_context("spawn").Process(
        target=_dies_mid_trial, args=(storage_url, study_name))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 1
    dead = study.get_trials()[0]
    assert dead.state == optuna.trial.TrialState.RUNNING  # nobody told it otherwise
    # past the grace period (2 s) since its last heartbeat, on any machine: SQLite keeps
    # heartbeats to the second, so 2.5 s can read as 2 (not stale); 4 s reads as 3 at least
    time.sleep(4)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=1)
    first, retry = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params  # the same point, run again
    assert retry.system_attrs["failed_trial"] == first.number


def test_a_storage_password_is_never_written(postgres_url, study_name, tmp_path, capfd):
    """The password of a storage URL stays out of logs, reports, model files and the
    study's attributes and note (the server here trusts any password)."""
    import json

    from sqlalchemy.engine import make_url

    from search.run import main

    secret = "s3cret-pw-7f"
    url = make_url(postgres_url).set(password=secret).render_as_string(hide_password=False)
    assert main(["--study", "mlp", "--data", "digits", "--n-trials", "2", "--epochs", "2",
                 "--final-seeds", "1", "--storage", url, "--study-name", study_name,
                 "--runs-dir", str(tmp_path / "runs"),
                 "--artifact-dir", str(tmp_path / "artifacts")]) == 0
    out, err = capfd.readouterr()
    assert secret not in out + err and "***" in err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "report.md" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    assert secret not in json.dumps(study.user_attrs)
    assert secret not in json.dumps(study._storage.get_study_system_attrs(study._study_id))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() outside optimize
def test_count_trials_counts_every_state_in_one_query(storage_url, study_name):
    """storage.count_trials, which lets the budget checks skip reading every trial while a
    study is under its limit: every trial of the study in any state, no other study's."""
    from sqlalchemy import event

    opened = storage.open(storage_url)
    other = optuna.create_study(storage=opened, study_name=study_name + "-other")
    other.optimize(lambda t: 0.0, n_trials=2)
    study = optuna.create_study(storage=opened, study_name=study_name)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.ask()  # running
    study.enqueue_trial({"x": 0.5})  # waiting
    statements = []
    event.listen(opened.engine, "before_cursor_execute",
                 lambda *args: statements.append(args[2]))
    counted = storage.count_trials(study)
    queries = [s for s in statements if not s.startswith("BEGIN")]  # SQLite's BEGIN IMMEDIATE
    assert len(queries) == 1 and "count(" in queries[0].lower()
    assert counted == len(study.get_trials()) == 7
    in_memory = optuna.create_study()
    in_memory.optimize(lambda t: 0.0, n_trials=2)
    assert storage.count_trials(in_memory) == 2


@pytest.fixture
def new_york():
    """The process's local time zone is New York's for the test (Optuna shows the trials'
    stored UTC times in local time)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


def _shown(trials) -> list[str]:
    """Each trial as every field it holds, in order, a dict's items in key order (the
    database returns attributes in any order; Optuna 4.9's ORM and 5.0's differ there)
    (repr: nan equals nan here)."""
    return [repr({field: sorted(value.items(), key=lambda item: str(item[0]))
                  if isinstance(value, dict) else value for field, value in vars(t).items()})
            for t in trials]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() outside optimize
@pytest.mark.parametrize("directions", [["maximize"], ["minimize", "maximize"]])
def test_core_reads_equal_optunas(storage_url, study_name, directions, new_york, monkeypatch):
    """storage.reads.CoreReadStorage builds the same FrozenTrials as Optuna's ORM reads, field
    by field and in order, for every trial state, distribution kind, value kind (inf, nan),
    attribute kind and read Optuna's cache wrapper makes; and the same study attributes.
    In a time zone other than UTC, where the stored times are shown converted."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from storage import reads
    from storage.reads import CoreReadStorage

    monkeypatch.setattr(reads, "CHUNK", 5)  # ids in three chunks, as in a study of 1,000
    opened = storage.open(storage_url)
    server = not storage_url.startswith("sqlite")
    assert (type(opened) is CoreReadStorage) == server  # SQLite keeps Optuna's (storage.open)
    if not server:  # the same reads, checked on SQLite too
        opened.__class__ = CoreReadStorage
    study = optuna.create_study(storage=opened, study_name=study_name, directions=directions)
    study.set_user_attr("max_trials", 40)
    study.set_user_attr("dataset", {"name": "digits", "n": [1, 2]})
    kinds = {"f": FloatDistribution(0, 1), "log": FloatDistribution(1e-4, 1, log=True),
             "step": FloatDistribution(0, 1, step=0.25), "i": IntDistribution(1, 10),
             "ilog": IntDistribution(32, 1024, log=True),
             "c": CategoricalDistribution(["a", None, True, 2.5])}
    chosen = dict(zip(kinds, [0.5, 0.01, 0.75, 3, 100, None], strict=True))
    single = len(directions) == 1
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        for value in (0.25, float("inf"), -float("inf")):
            steps = {1: 0.5, 2: float("nan"), 3: value} if single else {}
            study.add_trial(create_trial(
                state=state, params=chosen, distributions=kinds,
                values=[value] * len(directions) if state == TrialState.COMPLETE else None,
                intermediate_values=steps, user_attrs={"a": [1, 2], "b": {"x": None}},
                system_attrs={"completed_rung_0": value}))
    running = study.ask()
    running.suggest_float("f", 0, 1)
    running.set_user_attr("worker", 3)
    if single:
        running.report(0.125, 1)
    study.enqueue_trial({"f": 0.5}, user_attrs={"queued": True})
    study.enqueue_trial({"i": 4})
    study.ask({"step": FloatDistribution(0, 1, step=0.25)})  # the first queued one, popped
    rdb, study_id = study._storage._backend, study._study_id
    assert type(rdb) is CoreReadStorage
    optunas = optuna.storages.RDBStorage
    every = optunas._get_trials(rdb, study_id, None, set(), -1)
    assert len(every) == 12 and {t.state for t in every} == set(TrialState)
    assert sum(bool(t.params) for t in every) == 11  # a queued trial has none yet
    for states in (None, (TrialState.COMPLETE, TrialState.PRUNED), (TrialState.RUNNING,)):
        # what Optuna's cache wrapper asks: everything, the unfinished and the newer ones
        for included, newer in ((set(), -1), ({running._trial_id}, 10**9),
                                ({running._trial_id}, every[4]._trial_id), (set(), 5)):
            ours = rdb._get_trials(study_id, states, included, newer)
            assert _shown(ours) == _shown(optunas._get_trials(rdb, study_id, states, included,
                                                             newer))
    for trial in every:
        assert _shown([rdb.get_trial(trial._trial_id)]) == _shown([trial])
    assert _shown(study.get_trials()) == _shown(every)  # through Optuna's cache wrapper
    assert rdb.get_study_user_attrs(study_id) == optunas.get_study_user_attrs(rdb, study_id)
    assert study.user_attrs["dataset"] == {"name": "digits", "n": [1, 2]}
    missing = max(t._trial_id for t in every) + 1000
    for read in (lambda: rdb.get_trial(missing), lambda: rdb._get_trials(10**8, None, set(), -1),
                 lambda: rdb.get_study_user_attrs(10**8)):
        with pytest.raises(KeyError):
            read()
