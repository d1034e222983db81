"""Reader for the IDX format MNIST and Fashion-MNIST are distributed in (gzipped or not).

Used by `search.data` for `--data mnist|fashion-mnist --data-dir DIR`. Every failure is a
DataError naming the file, so a user sees which of the four files is wrong.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from search.errors import DataError

# The third byte of the magic number gives the element type; MNIST uses only ubyte (0x08).
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_HEADER = 4 + 4 * 4
# 16 GiB: far above MNIST's 47 MB; a header claiming more is refused before any allocation
MAX_IDX_BYTES = 1 << 34


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped; a gzip stream is inflated only as far as the IDX header
    it holds says it needs (plus one byte, to see a file that is too long), so a small file
    cannot make this allocate gigabytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, _MAX_HEADER)
        need = _data_size(data)
        if need is not None and need <= MAX_IDX_BYTES:
            data += inflater.decompress(inflater.unconsumed_tail, max(1, need + 1 - len(data)))
        else:
            need = _MAX_HEADER - 1  # read_idx reports the bad header or the absurd size
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    if len(data) <= need and not inflater.eof:
        raise DataError(f"{path}: corrupt gzip data (the stream ends early: truncated?)")
    return data


def _data_size(head: bytes) -> int | None:
    """Bytes the IDX header at the start of `head` says the file holds, None if unreadable."""
    if len(head) < 4 or head[:2] != b"\x00\x00" or not 0 < head[3] <= 4:
        return None
    size = 4 + 4 * head[3]
    if len(head) < size:
        return None
    return size + math.prod(struct.unpack(f">{head[3]}I", head[4:size]))


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
    expected = math.prod(dims)
    if expected > MAX_IDX_BYTES:
        raise DataError(f"{path}: header says {'x'.join(map(str, dims))} bytes of data, more "
                        f"than the {MAX_IDX_BYTES >> 30} GiB this reader accepts")
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"file has {actual} (truncated or wrong file?)"
        )
    # copy: frombuffer is read-only, and torch warns about tensors over read-only memory
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_file(directory: Path, stem: str) -> Path | None:
    """The IDX file `stem` in `directory`, plain or `.gz`, or None when none exists. Also
    the spelling with a dot before "idx" (`train-images.idx3-ubyte`), which some mirrors and
    packages of MNIST use."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
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
