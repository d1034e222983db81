"""Several machines through Optuna's gRPC storage proxy: `python -m search.proxy` in front of
a database, `python -m search.run --storage grpc://HOST:PORT` on each machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import storage
from search import budget
from search.errors import StorageError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--study", "mlp", "--data", "digits", "--device", "cpu", "--workers", "1",
        "--epochs", "2"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(module: str, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def proxy(tmp_path):
    """A proxy serving a new SQLite database of tmp_path; yields its grpc:// URL."""
    port = _free_port()
    server = _command("search.proxy", ["--storage", f"sqlite:///{tmp_path / 'shared.db'}",
                                       "--port", str(port)], tmp_path)
    yield f"grpc://127.0.0.1:{port}"
    server.terminate()
    server.communicate(timeout=60)


def test_two_machines_share_one_study_and_budget_through_the_proxy(proxy, tmp_path):
    # storage.open waits for the proxy (up to CONNECT_TIMEOUT_S), so no sleep is needed here
    machines = [_command("search.run", [
        *TINY, "--storage", proxy, "--study-name", "shared", "--n-trials", "50",
        "--max-trials", "6", "--final-seeds", "1", "--runs-dir", str(tmp_path / f"runs{i}"),
        "--artifact-dir", str(tmp_path / "artifacts")], tmp_path) for i in range(2)]
    outputs = [m.communicate(timeout=600) for m in machines]
    for machine, (_, err) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage.open(proxy))
    assert budget.budget_used(study) == 6  # exactly, though each machine asked for 50
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    finals = [err for _, err in outputs if "final model: test accuracy" in err]
    assert len(finals) == 1, [err[-500:] for _, err in outputs]
    assert len([p for p in tmp_path.glob("runs*/shared") if p.is_dir()]) == 1
    # the claim is a study of its own, recorded in the study too, and no other study's rival
    claims = [s for s in optuna.get_all_study_summaries(storage.open(proxy))
              if s.study_name.startswith("shared:final_claim:")]
    assert len(claims) == 1
    assert study.user_attrs[claims[0].study_name.split(":", 1)[1]]["pid"] > 0


def test_a_proxy_that_is_not_there_is_one_line(tmp_path):
    url = f"grpc://127.0.0.1:{_free_port()}"
    with pytest.raises(StorageError, match="cannot reach the storage proxy.*search.proxy"):
        storage.open(url)


@pytest.mark.parametrize("url", ["grpc://host", "grpc://:13000", "grpc://h:0",
                                 "grpc://h:70000", "grpc://h:port", "grpc://u@h:1"])
def test_a_malformed_grpc_url_is_refused_before_anything(url):
    with pytest.raises(StorageError, match="expected grpc://HOST:PORT"):
        storage.check(url)


def test_a_port_in_use_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from search import proxy as proxy_module

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = proxy_module.main(["--storage", f"sqlite:///{tmp_path / 'shared.db'}",
                                  "--port", str(port)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
    assert not list(tmp_path.iterdir())
