"""Shared fixtures: tiny data, and every storage backend this machine has.

PostgreSQL tests run against $SEARCH_TEST_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/test). Where no server answers they skip with that
reason, unless SEARCH_REQUIRE_SERVICES=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import numpy as np
import pytest
import sqlalchemy

from search import data as data_module
from search.models import vgg16 as vgg16_module

# the data loader's per-machine cache (search.data.cache_home): never the user's during
# tests; each test gets its own below, session fixtures this one
os.environ["SEARCH_CACHE_HOME"] = tempfile.mkdtemp(prefix="search-cache-home-")

POSTGRES_URL = os.environ.get(
    "SEARCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _postgres_reason() -> str | None:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # any failure means: not available here
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {str(exc).splitlines()[0]}"
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    reason = _postgres_reason()
    if reason is not None:
        if os.environ.get("SEARCH_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " (SEARCH_REQUIRE_SERVICES=1: this run needs it)")
        pytest.skip(reason)
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path) -> str:
    """Each test that takes this runs once per storage backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def study_name() -> str:
    """Unique per test, since the PostgreSQL database is shared between tests and runs."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8x8 digits with the service's splits: small enough to train in a second."""
    return data_module.load("digits")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    """Tests never reach the network; a test that wants a download patches _download."""
    monkeypatch.setattr(data_module, "_download", lambda name, directory: "offline (tests)")
    monkeypatch.setattr(vgg16_module, "_download", lambda url, path: "offline (tests)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))  # no cached weights
    monkeypatch.delenv("SEARCH_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras"))
    # beside the test's folder, not in it: like ~/.cache, it is not the folder a command
    # runs in (tests/test_bad_input.py holds that folder unchanged by a refused command)
    monkeypatch.setenv("SEARCH_CACHE_HOME", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _one_worker_unless_asked(request, monkeypatch):
    """In-process searches run their trials in the test's own process unless a test asks for
    --workers: the CPU default (one single-threaded worker per core, search.workers) would
    spawn fresh processes for every test and double the suite's time. The default has tests
    of its own (marked `cpu_default`) and the CLI tests that start real processes keep it."""
    from search import workers

    if request.node.get_closest_marker("cpu_default") is None:
        monkeypatch.setattr(workers, "CPU_WORKERS_PER_CORE", False)


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 images whose label is drawn in them (a bright bar at row 2 * label)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label + 4, 4:24] = 255
    return images, labels.astype(np.uint8)


def onnx_agrees(onnx_path, model, images, atol: float = 1e-4) -> None:
    """Runs model.onnx in onnxruntime here, on uint8 `images`, and asserts its scores are
    `model`'s (PyTorch) to `atol`, with the same predictions: not the flag the code wrote."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images.float() / 255
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    assert got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert float(np.abs(got - expected).max()) <= atol


def on_meta() -> bool:
    """Whether a study's builder is being called by search.costs, which counts a config's
    costs on the meta device before the trial builds its model: not one of the trial's
    builds, for tests that count those."""
    import torch

    return torch.get_default_device().type == "meta"


def wsgi_get(app, path: str) -> tuple[str, bytes]:
    """GET `path` from a WSGI app (optuna-dashboard's) without a server: (status, body)."""
    from wsgiref.util import setup_testing_defaults

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = {}

    def start_response(code, headers, exc_info=None):
        status["code"] = code

    body = b"".join(app(environ, start_response))
    return status["code"], body
