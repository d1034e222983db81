"""Your own images: `python -m search.run --study cnn --data PATH [--image-size N]`.

PATH is a folder in the layout torchvision's ImageFolder reads (one subfolder per class,
images inside, at any depth; with `train/` and `test/` subfolders those are the splits), or
a Keras-layout .npz (search.data reads those). `scan()` lists a folder's images and their
classes from file names alone; `decode()` reads them with Pillow, converted to 1 or 3
channels and resized once to one size, in parallel processes with a progress bar, into
uint8 [N, C, H, W]. search.data keeps the result in the per-machine cache, keyed by the
files' names, sizes and modification times, so the next run of the same folder decodes
nothing. `read_image()` prepares one new image file as a saved model expects it.

Nothing here imports torch: decoding processes start in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search.errors import DataError

log = logging.getLogger(__name__)

# what Pillow reads and an image folder usually holds; other files are ignored, and counted
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif",
                            ".tiff", ".ppm", ".pgm", ".pbm"})
RESIZE_FILTER = "bilinear"  # Pillow's, which averages over every source pixel when shrinking
DEFAULT_SIZE = 32  # when the images do not all share one size
MIN_SIZE, MAX_SIZE = 8, 1024  # --image-size: under 8 px (scikit-learn's digits) holds nothing
# An image of more pixels than this is refused before its pixels are decoded: a
# decompression bomb (a small PNG that inflates to gigabytes) costs nothing to reject.
MAX_IMAGE_PIXELS = 50_000_000
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
CHUNK = 256  # files per decoding job
# Decoding in several processes pays from about this many source pixels: on 2 cores,
# 4,000 PNGs of 128 px (65M pixels) loaded 1.3x sooner, 10,000 of 32 px (10M) no sooner
# (benchmarks/image_load.py)
PARALLEL_FROM = 30_000_000


@dataclass(frozen=True)
class ImageFile:
    path: str
    label: int
    split: str  # "train" or "test" (a folder without train/ and test/: all "train")
    size: int  # bytes, with the modification time part of the cache key
    mtime_ns: int


@dataclass(frozen=True)
class Listing:
    """A folder's images, their classes and splits, from file names alone."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[ImageFile, ...]
    has_test: bool  # train/ and test/ subfolders: the test split is given
    ignored: int = 0  # files that are not images (by suffix)

    def key(self) -> list:
        """What the decoded arrays depend on in the folder: every file's name, size and
        modification time."""
        return [(f.path, f.size, f.mtime_ns, f.label, f.split) for f in self.files]


def scan(root: Path) -> Listing:
    """List the images under `root`. Raises DataError on a layout that cannot be a data set:
    no class folders, a class folder with no images, a single class, a test class the
    training split lacks."""
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder or .npz file")
    splits = {"train": root / "train", "test": root / "test"}
    has_test = all(p.is_dir() for p in splits.values())
    tops = {"train": splits["train"], "test": splits["test"]} if has_test else {"train": root}
    classes = sorted(p.name for p in tops["train"].iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{tops['train']}: no class folders; put each class's images in a "
                        "folder named after it (cats/, dogs/, ...)")
    if len(classes) < 2:
        raise DataError(f"{tops['train']}: one class folder ({classes[0]}); a classifier "
                        "needs at least 2 classes")
    if has_test:
        extra = sorted(p.name for p in tops["test"].iterdir() if p.is_dir()
                       and not p.name.startswith(".") and p.name not in classes)
        if extra:
            raise DataError(f"{tops['test']}: class folder {extra[0]} has no counterpart in "
                            f"{tops['train']}; the test split can only hold trained classes")
    files, ignored = [], 0
    for split, top in tops.items():
        for label, name in enumerate(classes):
            folder = top / name
            found = 0
            for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
                if not path.is_file() or path.name.startswith("."):
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    ignored += 1
                    continue
                stat = path.stat()
                files.append(ImageFile(str(path.relative_to(root)), label, split, stat.st_size,
                                       stat.st_mtime_ns))
                found += 1
            if not found and split == "train":
                raise DataError(f"{folder}: class folder with no images (PNG, JPEG, BMP, "
                                "WebP, ...); add some or remove the folder")
    return Listing(root.resolve(), tuple(classes), tuple(files), has_test, ignored)


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    gray: bool


def _open(path: Path):
    """A lazily decoded Pillow image of `path`, its size checked. Raises DataError."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns of large images; they are refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise DataError(f"{path}: more than {MAX_IMAGE_PIXELS:,} pixels (too large to decode "
                        "safely); shrink it") from None
    except Exception as exc:  # noqa: BLE001 - any of a damaged file's errors in Pillow's parsers
        raise DataError(f"{path}: not an image Pillow can read ({_first(exc)})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(f"{path}: {width} x {height} pixels, more than "
                        f"{MAX_IMAGE_PIXELS:,} (too large to decode safely); shrink it")
    return image


def _first(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def headers(root: Path, paths: Sequence[str], skip_bad: bool) -> list[Header | None]:
    """Size and colour of each image from its header alone (None: unreadable, skipped)."""
    out: list[Header | None] = []
    for name in paths:
        try:
            with _open(root / name) as image:
                out.append(Header(image.width, image.height, image.mode in GRAY_MODES))
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{exc} (or pass --skip-bad-images)") from None
            log.warning("skipped: %s", exc)
            out.append(None)
    return out


def decode_one(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image as uint8 [C, H, W] at `size` (height, width). Raises DataError."""
    from PIL import Image

    with _open(path) as image:
        try:
            image.load()  # the pixels, here: a truncated file fails now, named
            if channels == 1:
                image = image.convert("L")
            else:
                image = image.convert("RGBA").convert("RGB") if image.mode in (
                    "P", "LA", "PA") else image.convert("RGB")
            if (image.height, image.width) != size:
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        except Exception as exc:  # noqa: BLE001 - truncated or damaged pixel data, any codec
            raise DataError(f"{path}: cannot decode ({_first(exc)})") from None
        pixels = np.array(image, dtype=np.uint8)  # a copy: writable, whatever the mode
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_chunk(root: str, names: list[str], size: tuple[int, int], channels: int,
                  skip_bad: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """The images of one job: their pixels, the indices (in `names`) decoded, and why the
    others were skipped."""
    out, kept, skipped = [], [], []
    for index, name in enumerate(names):
        try:
            out.append(decode_one(Path(root) / name, size, channels))
            kept.append(index)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    empty = np.zeros((0, channels, *size), np.uint8)
    return (np.stack(out) if out else empty), kept, skipped


def _pool(workers: int):
    """Processes that decode: forks of this one where it runs no other Python thread (they
    start in milliseconds and only decode, touching no lock another thread could hold),
    else spawned ones (a spawned process imports the command's own module first)."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    method = ("fork" if sys.platform.startswith("linux") and threading.active_count() == 1
              else "spawn")
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def decode(root: Path, names: Sequence[str], size: tuple[int, int], channels: int,
           skip_bad: bool = False, processes: int | None = None,
           pixels: int = 0) -> tuple[np.ndarray, list[int]]:
    """uint8 [N, C, H, W] of the images `names` (relative to `root`) and the indices of those
    decoded (all, unless `skip_bad` let unreadable ones be skipped, each logged), with a
    progress bar on a terminal. `processes` None: one per core when the images hold
    `pixels` >= PARALLEL_FROM source pixels in all, else this process alone."""
    from tqdm import tqdm

    jobs = [list(names[i:i + CHUNK]) for i in range(0, len(names), CHUNK)]
    workers = processes if processes is not None else (
        min(os.cpu_count() or 1, len(jobs)) if pixels >= PARALLEL_FROM else 1)
    pool = _pool(workers) if workers > 1 else None  # before the bar's monitor thread starts
    bar = tqdm(total=len(names), desc="decoding images", unit="img", file=sys.stderr,
               dynamic_ncols=True, disable=None)
    parts, kept, skipped = [], [], []
    broken = False
    try:
        if pool is None:
            results = (_decode_chunk(str(root), job, size, channels, skip_bad) for job in jobs)
        else:
            results = pool.map(_decode_chunk, [str(root)] * len(jobs), jobs,
                               [size] * len(jobs), [channels] * len(jobs),
                               [skip_bad] * len(jobs))
        for number, (pixels, indices, why) in enumerate(results):
            parts.append(pixels)
            kept += [number * CHUNK + i for i in indices]
            skipped += why
            bar.update(len(jobs[number]))
    except BrokenProcessPool:  # a decoding process died (killed, out of memory): once more here
        broken = True
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if broken:
        log.warning("a decoding process died; decoding in this process instead")
        return decode(root, names, size, channels, skip_bad, processes=1)
    for reason in skipped:
        log.warning("skipped: %s", reason)
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped (--skip-bad-images)",
                    len(skipped), len(names))
    empty = np.zeros((0, channels, *size), np.uint8)
    return (np.concatenate(parts) if parts else empty), kept


def target_shape(found: Sequence[Header], image_size: int | None, channels: int | None,
                 where: str) -> tuple[tuple[int, int], int, str | None]:
    """((height, width), channels, a note or None) for images with these headers: the
    requested size and channels, else their own size when all share one (else DEFAULT_SIZE,
    noted) and 1 channel when all are grayscale (else 3)."""
    sizes = {(h.height, h.width) for h in found}
    note = None
    if image_size is not None:
        size = (image_size, image_size)
    elif len(sizes) == 1:
        size = next(iter(sizes))
    else:
        size = (DEFAULT_SIZE, DEFAULT_SIZE)
        note = (f"{where}: images of {len(sizes)} sizes; all resized to {DEFAULT_SIZE} x "
                f"{DEFAULT_SIZE} px ({RESIZE_FILTER}); --image-size N sets another")
    if not (MIN_SIZE <= min(size) and max(size) <= MAX_SIZE):
        raise DataError(f"{where}: images of {size[1]} x {size[0]} px; give --image-size "
                        f"from {MIN_SIZE} to {MAX_SIZE}")
    if channels is None:
        channels = 1 if all(h.gray for h in found) else 3
    return size, channels, note


def check_memory(n: int, size: tuple[int, int], channels: int, where: str) -> None:
    """Refuse, before decoding, a set whose arrays would not fit in this machine's memory:
    the decoded uint8 images are held about three times while they are split (and once more
    as float batches, which are small)."""
    needed = 3 * n * channels * size[0] * size[1]
    available = available_memory()
    if available is not None and needed > available:
        raise DataError(f"{where}: {n:,} images at {size[1]} x {size[0]} px x {channels} "
                        f"channels need about {needed / 1e9:.1f} GB, more than the "
                        f"{available / 1e9:.1f} GB available; give a smaller --image-size")


def available_memory() -> int | None:
    """Bytes of memory available to this process now (None where the OS does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def convert_array(x: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, H, W, C] (C 1, 3 or 4) as [N, channels, height, width]: alpha dropped,
    colour to gray with Pillow's weights (L = 0.299 R + 0.587 G + 0.114 B), gray repeated to
    3 channels, and each image resized as decode_one resizes a file."""
    from PIL import Image

    x = x[..., :3]
    if channels == 1 and x.shape[3] == 3:
        wide = x.astype(np.uint32)
        weighted = wide[..., 0] * 299 + wide[..., 1] * 587 + wide[..., 2] * 114
        x = ((weighted + 500) // 1000).astype(np.uint8)[..., None]
    elif channels == 3 and x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    if tuple(x.shape[1:3]) != tuple(size):
        resized = [Image.fromarray(image[..., 0] if channels == 1 else image).resize(
            (size[1], size[0]), Image.Resampling.BILINEAR) for image in x]
        x = np.stack([np.asarray(image).reshape(size[0], size[1], channels)
                      for image in resized])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def read_image(path: str | Path, info: dict):
    """One image file prepared as the saved model `info` (model.json, e.g.
    `load_model(...).info`) expects it: converted to its channels, resized to its input
    size as the training images were, as a uint8 tensor [1, C, H, W]. Divide by 255 and
    give it to the model."""
    import torch

    channels, height, width = info["input"]["shape"]
    pixels = decode_one(Path(path), (int(height), int(width)), int(channels))
    return torch.from_numpy(pixels).unsqueeze(0)
