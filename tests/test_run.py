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


@pytest.mark.parametrize("args, message", [
    (["--study", "resnet"], "unknown study 'resnet'; valid studies: cnn, mlp"),
    (["--study", "mlp", "--n-trials", "0"], "--n-trials must be at least 1"),
    (["--study", "mlp", "--epochs", "-3"], "--epochs must be at least 1"),
    (["--study", "mlp", "--timeout", "0"], "--timeout must be positive"),
    (["--study", "mlp", "--storage", "mysql+nodriver://x"], "storage"),
    (["--study", "mlp", "--storage", "postgresql://postgres@127.0.0.1:1/x"],
     "cannot open storage"),
    (["--study", "mlp", "--data", "mnist", "--data-dir", "nowhere"],
     "data directory nowhere does not exist"),
    (["--study", "mlp", "--device", "cuda:banana"], "device"),
])
def test_bad_configuration_is_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("error: ")


@pytest.mark.parametrize("args, message", [
    (["--study", "mlp", "--n-trials", "many"], "invalid int value: 'many'"),
    (["--study", "mlp", "--data", "cifar"], "invalid choice: 'cifar'"),
    ([], "the following arguments are required: --study"),
])
def test_malformed_arguments_exit_2_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


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


def test_bad_worker_count_is_one_line(capsys):
    assert main(["--study", "mlp", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("study, epochs", [("mlp", 20), ("cnn", 8)])
def test_epochs_default_to_the_studys_own(study, epochs):
    from search.run import config_from_args

    assert config_from_args(["--study", study]).epochs == epochs
    assert config_from_args(["--study", study, "--epochs", "3"]).epochs == 3
    assert config_from_args(["--study", study, "--cache-dir", "c"]).cache_dir == "c"
