"""The command line: help, errors as one line with exit code 2, and a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search.run import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_studies(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "mlp " in result.stdout and "optuna-dashboard" in result.stdout


# every bad flag and file: tests/test_bad_input.py


def test_malformed_idx_file_is_one_line_naming_it(tmp_path, capsys):
    from tests.test_data import write_mnist_dir

    write_mnist_dir(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    assert main(["--study", "mlp", "--data", "mnist", "--data-dir", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t10k-images-idx3-ubyte" in err[0]


def test_no_traceback_from_a_real_process(tmp_path):
    result = run_cli("--study", "mlp", "--storage", "sqlite:///no/such/dir.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: storage sqlite:///no/such/dir.db: directory no/such does not exist; "
        "create it first"
    ]


def test_end_to_end_run_writes_study_and_final_files(tmp_path):
    result = run_cli("--study", "mlp", "--data", "digits", "--n-trials", "4", "--epochs", "3",
                     "--final-seeds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trial 0 COMPLETE" in result.stderr and "[lecture]" in result.stderr
    assert "best=" in result.stderr
    study = optuna.load_study(study_name="mlp-digits", storage="sqlite:///studies.db")
    assert len(study.trials) == 4 and study.best_value > 0.8
    assert (tmp_path / "studies.db").is_file()
    for name in ("model.pt", "model.json", "model.onnx", "metrics.json", "report.html"):
        assert (tmp_path / "runs" / "mlp-digits" / name).is_file()
    assert any((tmp_path / "studies-artifacts").iterdir())
    assert "final model: test accuracy" in result.stderr


def test_two_workers_share_one_budget_and_log_every_trial(tmp_path):
    result = run_cli("--study", "mlp", "--data", "digits", "--n-trials", "6", "--epochs", "2",
                     "--workers", "2", "--device", "cpu", "--no-final", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 workers on cpu, cpu" in result.stderr
    study = optuna.load_study(study_name="mlp-digits", storage="sqlite:///studies.db")
    trials = study.get_trials()
    # workers stop at the budget; two finishing at the same instant may add one more
    assert 6 <= len(trials) <= 7
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    assert sorted(t.user_attrs.get("reference", "") for t in trials)[-2:] == ["lecture", "seed"]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    for trial in trials:
        assert f"trial {trial.number} " in result.stderr


@pytest.mark.parametrize("study, epochs", [("mlp", 20), ("cnn", 8)])
def test_epochs_default_to_the_studys_own(study, epochs):
    from search.run import config_from_args

    assert config_from_args(["--study", study]).epochs == epochs
    assert config_from_args(["--study", study, "--epochs", "3"]).epochs == 3
    assert config_from_args(["--study", study, "--cache-dir", "c"]).cache_dir == "c"
