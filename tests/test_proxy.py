"""Optuna's gRPC storage proxy: `python -m search.proxy` in front of a database,
`--storage grpc://HOST:PORT` on each machine. Two machines through it, as docs/scaling.md
writes them: tests/test_docs.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from search.errors import StorageError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(module: str, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_proxy_that_is_not_there_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_S", 1)  # the wait, not its length, is tested
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
