"""Arrays that many trials reuse, kept on disk beside the storage (studies-cache/).

Used for augmented copies of the training split (search.augment) and for frozen-backbone
features (search.features). A file is named by a hash of everything it depends on, so a
changed key is simply another file. It is written under a temporary name and renamed into
place, with its sha256 in a file beside it: a reader sees a whole file or none, and a file
that is truncated, corrupted or lacks its digest is made again, never trusted. A lock file
per name keeps concurrent workers from making the same array twice. A `SizeBound` keeps a
cache folder under a size (`--cache-max-gb`): after each new array, the least recently used
ones (by the time they were last written or read) are removed until the folder fits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pixels_sha256(images) -> str:
    """The sha256 of a tensor's bytes (a split's pixels): part of every cache key, so other
    data, another split or other files never match."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def key_name(key: dict) -> str:
    """A file name for everything an array depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SizeBound:
    """At most `max_bytes` of arrays under `root` (every ArrayStore below it counts)."""

    root: Path
    max_bytes: int

    @classmethod
    def gigabytes(cls, root: Path, gb: float | None) -> SizeBound | None:
        return None if gb is None else cls(Path(root), int(gb * 2**30))

    def make_room(self, keep: Path) -> list[Path]:
        """Remove the least recently used arrays under `root` (never `keep`, the one just
        written) until the arrays there take at most max_bytes. Returns what was removed.
        A file another process removed meanwhile is skipped; one it is reading stays
        readable to it (POSIX), and a reader that finds none makes the array again."""
        entries = []
        for path in self.root.rglob("*.npy"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                path.with_suffix(".sha256").unlink(missing_ok=True)
                removed.append(path)
            total -= size
        if removed:
            log.info("cache %s: removed %d least recently used arrays to stay under %.1f GB",
                     self.root, len(removed), self.max_bytes / 2**30)
        return removed


class ArrayStore:
    """Arrays in `directory` by name, kept within `bound` if given; see the module doc."""

    def __init__(self, directory: Path, bound: SizeBound | None = None) -> None:
        self.directory = Path(directory)
        self.bound = bound

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.npy", self.directory / f"{name}.sha256"

    def read(self, name: str, shape: tuple | None = None, dtype=None) -> np.ndarray | None:
        """The array stored as `name`, or None when it is missing, damaged or not of the
        given shape and dtype."""
        array_path, digest_path = self.paths(name)
        try:
            expected = digest_path.read_text(encoding="utf-8").strip()
            data = array_path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning("cache file %s is truncated or corrupt; making it again", array_path)
            return None
        try:
            array = read_npy(data)
        except ValueError:
            return None
        if (shape is not None and array.shape != tuple(shape)) or (
                dtype is not None and array.dtype != np.dtype(dtype)):
            return None
        with contextlib.suppress(OSError):  # used now: the last a size bound removes
            os.utime(array_path)
        return array

    def get_or_make(self, name: str, make: Callable[[], np.ndarray], shape: tuple | None = None,
                    dtype=None) -> tuple[np.ndarray, bool]:
        """(array, made): read `name`, else make it under the lock and store it."""
        from filelock import FileLock

        array = self.read(name, shape, dtype)
        if array is not None:
            return array, False
        self.directory.mkdir(parents=True, exist_ok=True)
        array_path, digest_path = self.paths(name)
        with FileLock(str(array_path) + ".lock"):
            array = self.read(name, shape, dtype)  # another worker may have made it meanwhile
            if array is not None:
                return array, False
            array = make()
            self.put(name, array)
        return array, True

    def put(self, name: str, array: np.ndarray) -> None:
        """Store `array` as `name`: the array, then its digest, each renamed into place."""
        self.directory.mkdir(parents=True, exist_ok=True)
        array_path, digest_path = self.paths(name)
        data = _npy_bytes(array)
        _write_atomically(array_path, data)
        _write_atomically(digest_path, hashlib.sha256(data).hexdigest().encode())
        if self.bound is not None:
            self.bound.make_room(keep=array_path)


def read_npy(data: bytes) -> np.ndarray:
    """The array in .npy bytes. Its header is checked before anything is allocated:
    ValueError when the header is damaged, the array holds Python objects, or the header
    claims other than the bytes that follow it (np.load would allocate first)."""
    handle = io.BytesIO(data)
    try:  # numpy parses the header as a Python literal: damage raises more than ValueError
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy version {version} is not 1.0 or 2.0")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(handle)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - SyntaxError, TokenError, MemoryError, ...
        raise ValueError(f"damaged .npy header ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    count = math.prod(shape)
    follow = len(data) - handle.tell()
    if count * dtype.itemsize != follow:
        raise ValueError(f"its header claims shape {shape} of {dtype}, {follow:,} bytes follow "
                         "it (truncated or damaged)")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=handle.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)  # readers see the old file or the whole new one
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
