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


# what a forged model.json asks for: each refused before torch allocates it
FORGERIES = {
    "131 GB input": {"input": {"shape": [3, 4096, 4096]}},
    "8.6 GB input, allocatable": {"input": {"shape": [1, 2048, 2048]}},
    "width 2e9": {"params": {"n_units_l0": 2_000_000_000}},
    "width within the space, not the file": {"params": {"n_units_l0": 1024}},
    "a width as text": {"params": {"n_units_l1": "256"}},
    "a pair outside the space": {"params": {"pair": "relu_everything"}},
    "a param missing": {"params": {"n_units_l1": None}},
    "vgg16 input size": {"options": {"input_size": 10**6}},
}
# a child that reads each forged pair, then says its own peak resident memory, which torch's
# allocations count towards (tracemalloc sees only Python's)
_READ_FORGERIES = """
import json, resource, sys
from search.export import ModelFileError, load_model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
said = {}
for path in sys.argv[1:]:
    try:
        load_model(path)
        said[path] = None
    except ModelFileError as exc:
        said[path] = str(exc)
print(json.dumps({"said": said, "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  - base}))
"""


def test_forged_model_json_is_refused_before_anything_is_allocated(saved, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    info = json.loads((saved / "model.json").read_text())
    paths = {}
    for name, forged in FORGERIES.items():
        folder = tmp_path / name.replace(" ", "-").replace(",", "")
        folder.mkdir()
        shutil.copy(saved / "model.pt", folder / "model.pt")
        changed = {**info}
        for key, values in forged.items():
            changed[key] = {k: v for k, v in {**info.get(key, {}), **values}.items()
                            if v is not None}
        (folder / "model.json").write_text(json.dumps(changed))
        paths[name] = str(folder / "model.pt")
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", _READ_FORGERIES, *paths.values()],
                           capture_output=True, text=True, cwd=root, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.splitlines()[-1])
    said = result["said"]
    for name, path in paths.items():
        assert said[path] is not None, f"{name}: loaded"
        assert "\n" not in said[path] and path.rsplit("/", 2)[1] in said[path], said[path]
    assert "it describes 25,769,938,188 numbers" in said[paths["131 GB input"]]
    assert "not an integer from 32 to 1024" in said[paths["width 2e9"]]
    assert "is not one of" in said[paths["a pair outside the space"]]
    assert "'n_units_l1' is missing" in said[paths["a param missing"]]
    # the pair the forgeries were made from is a 1x8x8 lecture MLP: a few hundred KB
    assert result["grew_kb"] < 64 * 1024, f"peak memory grew by {result['grew_kb']:,} KB"


def test_evaluate_refuses_a_forged_model_in_one_line(saved, tmp_path, capsys):
    from search.evaluate import main

    shutil.copy(saved / "model.pt", tmp_path / "model.pt")
    info = json.loads((saved / "model.json").read_text())
    info["input"]["shape"] = [3, 4096, 4096]
    (tmp_path / "model.json").write_text(json.dumps(info))
    assert main([str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not fit the architecture" in err


def _valid_image(kind: str) -> bytes:
    from PIL import Image

    pixels = (np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(12, 10, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


@FUZZ
@given(content=st.one_of(*(_mutations(_valid_image(kind)) for kind in ("PNG", "JPEG", "BMP"))),
       channels=st.sampled_from([1, 3]))
def test_image_reader(tmp_path, content, channels):
    from search.images import decode_one

    path = tmp_path / "image.png"
    path.write_bytes(content)
    try:
        pixels = _bounded(lambda: decode_one(path, (8, 8), channels))
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert pixels.dtype == np.uint8 and pixels.shape == (channels, 8, 8)


_WARM: list[bool] = []


def _valid_user_npz() -> bytes:
    buffer = io.BytesIO()
    x = (np.arange(30 * 6 * 6 * 3) % 251).astype(np.uint8).reshape(30, 6, 6, 3)
    y = np.arange(30) % 3
    np.savez(buffer, x_train=x[:24], y_train=y[:24], x_test=x[24:], y_test=y[24:],
             class_names=np.array(["a", "b", "c"]))
    return buffer.getvalue()


@FUZZ
@given(content=_mutations(_valid_user_npz()))
def test_user_npz_reader(tmp_path, content):
    path = tmp_path / "mine.npz"
    options = data_module.ImageOptions(image_size=8)
    if not _WARM:  # the first load imports scikit-learn and Pillow: not the reader's memory
        path.write_bytes(_valid_user_npz())
        data_module.load(str(path), images=options)
        _WARM.append(True)
    path.write_bytes(content)
    try:
        dataset = _bounded(lambda: data_module.load(str(path), images=options))
    except DataError as exc:
        assert "\n" not in str(exc)
    else:
        assert dataset.train.x.dtype == torch.uint8 and dataset.image_shape[1:] == (8, 8)
