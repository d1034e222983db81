"""Several machines on one study, killed workers, Ctrl-C, resuming with other settings.

"Workers" are the processes of one `--workers 2` run. Machines sharing one PostgreSQL
study, as docs/scaling.md writes the commands: tests/test_docs.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch

from search import budget
from search.config import RunConfig
from search.final import run_final
from search.run import search
from tests.conftest import on_meta

ROOT = Path(__file__).resolve().parents[1]
# one worker per "machine": the CPU default (one per core) would start 2 processes in each of
# the three machines on CI's 2 cores; a test about workers passes --workers 2 after this
TINY = ["--study", "mlp", "--data", "digits", "--device", "cpu", "--workers", "1"]
# trials that run seconds each, whatever is drawn (60 epochs of digits took 1.7 s, and
# successive halving pruned most trials after one: a run could end before the test acted)
LONG_TRIALS = ["--epochs", "100", "--pruner", "none"]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A test that fails while its run is training would leave the run (in its own session,
    out of pytest's reach) taking the cores every later test needs: it is killed here."""
    yield
    while _STARTED:
        run = _STARTED.pop()
        if run.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.communicate()


def _start(args, cwd, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, **kwargs)
    _STARTED.append(run)
    return run


def test_a_killed_worker_is_failed_retried_and_replaced(tmp_path):
    run = _start([*TINY, "--n-trials", "5", *LONG_TRIALS, "--workers", "2", "--no-final"],
                 cwd=tmp_path)
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    victim = None
    deadline = time.monotonic() + 300
    # a spawned worker in the middle of a trial (the parent runs trials too: not that one)
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="mlp-digits", storage=storage_url)
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # the study is not created yet
            continue
        pids = [int(w.split(":")[1]) for t in running if (w := t.user_attrs.get("worker"))]
        victim = next((pid for pid in pids if pid != run.pid), None)
    assert victim is not None, "no trial started"
    os.kill(victim, signal.SIGKILL)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert "died (exit code -9); trial" in err and "failed and retried" in err
    assert "Traceback" not in err
    study = optuna.load_study(study_name="mlp-digits", storage=storage_url)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state in (optuna.trial.TrialState.COMPLETE,
                                                      optuna.trial.TrialState.PRUNED)
    assert budget.budget_used(study) == 5  # exactly: the retry took the failed trial's place


def test_ctrl_c_stops_every_worker_in_one_line_and_the_next_run_resumes(tmp_path):
    # a budget no machine finishes before the signal: the run must end by the Ctrl-C alone
    run = _start([*TINY, "--n-trials", "10000", *LONG_TRIALS, "--workers", "2",
                  "--no-final"], cwd=tmp_path)
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if run.poll() is not None:  # it cannot have finished its budget: it failed
            pytest.fail(f"the run ended (exit code {run.returncode}) before the signal: "
                        f"{run.communicate()[1][-2000:]}")
        try:
            study = optuna.load_study(study_name="mlp-digits", storage=storage_url)
            if len(study.get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 2:
                break
        except Exception:
            continue
    else:
        pytest.fail("two trials never ran at once")
    os.killpg(run.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole group
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        "interrupted: finished trials are saved; run the same command to resume"]
    study = optuna.load_study(study_name="mlp-digits", storage=storage_url)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    before = len(study.trials)
    again = _start([*TINY, "--n-trials", "2", "--epochs", "2", "--no-final"], cwd=tmp_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"{before} trials so far" in err


def test_resuming_with_other_settings_is_recorded_warned_and_reported(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    first = RunConfig(study="mlp", data="digits", n_trials=3, epochs=1, storage=url,
                      runs_dir=str(tmp_path / "runs"), final_seeds=1)
    search(first)
    second = RunConfig(**{**first.__dict__, "epochs": 3, "batch_size": 64})
    study, opened, dataset = search(second)
    assert "was started with other settings (epochs 1 -> 3, batch_size 128 -> 64)" in caplog.text
    settings = {t.number: t.user_attrs["settings"] for t in study.trials}
    assert {s["epochs"] for s in settings.values()} == {1, 3}
    outcome = run_final(study, second, opened, dataset)
    best = study.best_trial.user_attrs["settings"]
    assert outcome.model_info["training"]["trial_epochs"] == best["epochs"]
    assert outcome.model_info["training"]["batch_size"] == best["batch_size"]
    report = (Path(second.runs_dir) / "mlp-digits" / "report.md").read_text(encoding="utf-8")
    assert "**Mixed settings.**" in report and "| 64 |" in report


def test_the_budget_counts_a_retried_trial_once():
    study = optuna.create_study()
    study.set_user_attr("max_trials", 3)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert budget.budget_used(study) == 3 and budget.remaining(study) == 0
    with warnings.catch_warnings():  # renamed in Optuna 4.9; search.workers uses it too
        warnings.simplefilter("ignore")
        optuna.storages.RetryFailedTrialCallback()(study, study.trials[-1])
    assert budget.budget_used(study) == 2  # the failed one gives its place to its retry
    assert not budget.over_budget(study, study.ask().number)  # the retry runs
    assert budget.over_budget(study, study.ask().number)  # one more would not


def test_an_out_of_memory_trial_is_one_log_line_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                   capsys):
    import dataclasses

    from search import registry
    from search.run import main

    spec = registry.get("mlp")
    builds = []

    class Exhausted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def build(params, *args, **kwargs):
        built = spec.build(params, *args, **kwargs)
        if on_meta():
            return built
        builds.append(params)
        return dataclasses.replace(built, model=Exhausted()) if len(builds) == 2 else built

    monkeypatch.setattr(registry, "STUDIES",
                        {**registry.STUDIES, "mlp": dataclasses.replace(spec, build=build)})
    assert main([*TINY, "--n-trials", "3", "--epochs", "1", "--no-final"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "80.00 GiB" in err
    lines = [line for line in err.splitlines() if "out of memory" in line]
    assert len(lines) == 1 and "trial 1 FAIL" in lines[0]
    assert "trial 2 COMPLETE" in err
