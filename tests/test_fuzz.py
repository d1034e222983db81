"""Every file reader, fed random, truncated and forged bytes (hypothesis).

A reader either returns what a good file holds or raises its one clean error (DataError,
ModelFileError, WeightsError; the cache's read returns None and makes the array again). It
never raises anything else, never hangs (hypothesis's deadline) and never allocates much more
than the file it reads (tracemalloc's peak). Examples are bounded and derandomized, so a CI
run is repeatable and short.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search import data as data_module
from search.cache import ArrayStore
from search.errors import DataError
from search.export import ModelFileError, load_model, sha256_of
from search.idx import read_idx
from search.models.vgg16 import WeightsError, resolve_weights

FUZZ = settings(max_examples=60, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
PEAK_LIMIT = 32 << 20  # bytes; every input here is under 64 KB


def _bounded(call):
    """call(), and the peak memory it allocated (numpy and bytes are traced)."""
    tracemalloc.start()
    try:
        result = call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"allocated {peak:,} bytes"
    return result


def _valid_idx(ndim: int) -> bytes:
    path = io.BytesIO()
    shape = (6, 4, 4) if ndim == 3 else (6,)
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    header = struct.pack(">HBB", 0, 8, ndim) + struct.pack(f">{ndim}I", *shape)
    path.write(header + array.tobytes())
    return path.getvalue()


def _mutations(valid: bytes):
    """Random bytes, a truncation of `valid`, and `valid` with bytes overwritten."""
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda edit: valid[:edit[0]] + edit[1] + valid[edit[0] + len(edit[1]):]),
    )


@FUZZ
@given(content=_mutations(_valid_idx(3)), ndim=st.sampled_from([1, 3]),
       compress=st.booleans())
def test_idx_reader(tmp_path, content, ndim, compress):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(content) if compress else content)
    try:
        array = _bounded(lambda: read_idx(path, ndim))
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert array.ndim == ndim and array.dtype == np.uint8


@FUZZ
@given(dims=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3),
       tail=st.binary(max_size=64), compress=st.booleans())
def test_idx_header_claiming_any_size_allocates_nothing_large(tmp_path, dims, tail, compress):
    """Headers up to 2**96 bytes, and gzip streams that inflate far beyond their size."""
    raw = struct.pack(">HBBIII", 0, 8, 3, *dims) + tail + b"\x00" * 200_000
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw[:4096])
    try:
        _bounded(lambda: read_idx(path, 3))
    except DataError:
        pass


def _valid_npz() -> bytes:
    buffer = io.BytesIO()
    x = np.zeros((20, 28, 28), np.uint8)
    y = np.arange(20, dtype=np.uint8) % 10
    np.savez_compressed(buffer, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    return buffer.getvalue()


@FUZZ
@given(content=_mutations(_valid_npz()))
def test_keras_npz_reader(tmp_path, content):
    path = tmp_path / "mnist.npz"
    path.write_bytes(content)
    try:
        arrays = _bounded(lambda: data_module._read_keras_npz(path))
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert arrays[0].dtype == np.uint8 and arrays[0].shape[1:] == (28, 28)


@FUZZ
@given(shape=st.lists(st.integers(0, 2**40), min_size=1, max_size=3))
def test_npz_whose_header_claims_a_huge_array(tmp_path, shape):
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    path = tmp_path / "mnist.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{key}.npy", npy.getvalue() + b"\x00" * 64)
    try:
        _bounded(lambda: data_module._read_keras_npz(path))
    except DataError:
        pass


@FUZZ
@given(content=_mutations(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, "
                          b"'shape': (4,), }" + b" " * 58 + b"\n" + b"\x00" * 16))
def test_cache_file_with_a_matching_digest_is_read_or_made_again(tmp_path, content):
    store = ArrayStore(tmp_path / "cache")
    store.directory.mkdir(exist_ok=True)
    array_path, digest_path = store.paths("a")
    array_path.write_bytes(content)
    digest_path.write_text(hashlib.sha256(content).hexdigest())  # a forged digest
    array = _bounded(lambda: store.read("a"))
    assert array is None or isinstance(array, np.ndarray)
    made, fresh = store.get_or_make("a", lambda: np.ones(3, np.float32), (3,), np.float32)
    assert made.shape == (3,) and (fresh or array is not None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real model.pt + model.json (an untrained mlp, saved the way the final step does)."""
    from search import export, registry

    folder = tmp_path_factory.mktemp("saved")
    spec = registry.get("mlp")
    params = spec.suggest(__import__("optuna").trial.FixedTrial(
        spec.to_trial_params(spec.references["lecture"])))
    model = spec.build(params, (1, 8, 8), 10, (0.3,), (0.2,)).model
    export.save_model(model, folder, {
        "study": "mlp", "params": spec.to_trial_params(spec.references["lecture"]),
        "input": {"shape": [1, 8, 8], "mean": [0.3], "std": [0.2]},
        "classes": [str(d) for d in range(10)]})
    load_model(folder / "model.pt")  # the unmutated pair loads
    return folder


@FUZZ
@given(content=_mutations(b'{"format": "optuna-search-model/1", "study": "mlp", "params": '
                          b'{"n_layers": 2}, "input": {"shape": [1, 8, 8]}, "classes": '
                          b'["a", "b"], "sha256": "00"}'))
def test_model_json_reader(saved, tmp_path, content):
    for name in ("model.pt", "model.json"):
        shutil.copy(saved / name, tmp_path / name)
    info = json.loads((saved / "model.json").read_text())
    try:  # keep the digest right when the mutation left valid JSON, so the rest is reached
        forged = json.loads(content)
        if isinstance(forged, dict):
            content = json.dumps({**forged, "sha256": info["sha256"]}).encode()
    except (ValueError, UnicodeDecodeError):
        pass
    (tmp_path / "model.json").write_bytes(content)
    with pytest.raises(ModelFileError) as raised:
        _bounded(lambda: load_model(tmp_path / "model.pt"))
    assert "\n" not in str(raised.value)


@FUZZ
@given(shape=st.lists(st.integers(-5, 2**31), min_size=0, max_size=4))
def test_model_json_with_a_forged_input_size(saved, tmp_path, shape):
    for name in ("model.pt", "model.json"):
        shutil.copy(saved / name, tmp_path / name)
    info = json.loads((tmp_path / "model.json").read_text())
    info["input"]["shape"] = shape
    (tmp_path / "model.json").write_text(json.dumps(info))
    try:
        _bounded(lambda: load_model(tmp_path / "model.pt"))
    except ModelFileError:
        pass


def _weights_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    return buffer.getvalue()


@settings(FUZZ, max_examples=30, deadline=20_000)  # a loadable dict is checked on a VGG16
@given(content=_mutations(_weights_bytes()))
def test_model_pt_and_weights_readers(saved, tmp_path, content):
    """model.pt with a digest that matches (an attacker can forge it), and --weights PATH."""
    shutil.copy(saved / "model.json", tmp_path / "model.json")
    (tmp_path / "model.pt").write_bytes(content)
    info = json.loads((tmp_path / "model.json").read_text())
    info["sha256"] = sha256_of(tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "model.pt")
    with pytest.raises(WeightsError):
        resolve_weights(str(tmp_path / "model.pt"))
