"""Reader for the IDX format MNIST and Fashion-MNIST are distributed in (gzipped or not).

Used by `search.data` for `--data mnist|fashion-mnist --data-dir DIR`. Every failure is a
DataError naming the file, so a user sees which of the four files is wrong.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from search.errors import DataError

# The third byte of the magic number gives the element type; MNIST uses only ubyte (0x08).
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    return raw


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes into an array of `expected_ndim` dimensions.

    Raises DataError when the file cannot be read, is not IDX, holds another element type or
    number of dimensions, or its size disagrees with the dimensions in its header.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    if dtype != _UBYTE:
        raise DataError(f"{path}: element type 0x{dtype:02x} is not unsigned byte (0x08)")
    if ndim != expected_ndim:
        raise DataError(
            f"{path}: has {ndim} dimensions, expected {expected_ndim} "
            f"({'images' if expected_ndim == 3 else 'labels'} file)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"file has {actual} (truncated or wrong file?)"
        )
    # copy: frombuffer is read-only, and torch warns about tensors over read-only memory
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_file(directory: Path, stem: str) -> Path | None:
    """The IDX file `stem` in `directory`, plain or `.gz`, or None when neither exists."""
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array as IDX (used by tests and by users converting their own data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UBYTE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
