"""storage.open: URL checks, and several worker processes sharing one study."""

from __future__ import annotations

import multiprocessing
import sqlite3
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

    def objective(trial):
        trial.suggest_float("x", -1, 1)
        time.sleep(1.5)  # long enough to record a heartbeat
        os._exit(1)  # the worker is killed: no exception, no tell

    study = optuna.load_study(study_name=name,
                              storage=storage.open(url, heartbeat_interval=1, grace_period=2))
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
    time.sleep(2.5)  # past the grace period
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
