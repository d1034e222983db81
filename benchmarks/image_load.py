"""python benchmarks/image_load.py [--images 10000] [--size 32] [--repeats 2]

How long `--data PATH` takes to load a folder of PNGs, the first time and every time after:
a folder of --images colour PNGs (10 classes, --size px, written once in a scratch folder)
is loaded through search.data.load, side by side, each arm --repeats times, interleaved:

  first load, parallel   the cache empty: every file decoded by one process per core
  first load, one process  the same with decoding in this process only
  cached load            the decoded arrays read back from the per-machine cache (the
                         files' names, sizes and modification times unchanged)

Each time is the fastest of the repeats, from the call to the returned data set (the
listing, decoding, splitting and normalization statistics included). Not a test: timings
on a shared machine are noisy. About a minute for 10,000 images on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's service


def _write_folder(root: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % 10
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[:, :, label % 3] //= 2  # a little signal per class
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def _load(folder: Path, cache: Path, parallel: bool) -> float:
    from search import data as data_module
    from search import images as images_module

    os.environ["SEARCH_CACHE_HOME"] = str(cache)
    images_module.PARALLEL_FROM = 0 if parallel else 10**18
    started = time.perf_counter()
    data_module.load(str(folder))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    with tempfile.TemporaryDirectory(prefix="image-load-") as scratch:
        folder = Path(scratch) / "pngs"
        started = time.perf_counter()
        _write_folder(folder, args.images, args.size)
        print(f"{args.images:,} PNGs of {args.size} x {args.size} px, 10 classes, written in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        times: dict[str, list[float]] = {"first load, parallel": [],
                                          "first load, one process": [], "cached load": []}
        for repeat in range(args.repeats):
            cold = Path(scratch) / f"cache-{repeat}"
            times["first load, parallel"].append(_load(folder, cold, parallel=True))
            times["cached load"].append(_load(folder, cold, parallel=True))
            times["first load, one process"].append(
                _load(folder, Path(scratch) / f"serial-{repeat}", parallel=False))
    best = {arm: min(values) for arm, values in times.items()}
    print(f"\n| arm | seconds (fastest of {args.repeats}) | images per second |")
    print("|---|---|---|")
    for arm, seconds in best.items():
        print(f"| {arm} | {seconds:.2f} s | {args.images / seconds:,.0f} |")
    print(f"\ncached / first load: {best['first load, parallel'] / best['cached load']:.1f}x "
          f"sooner; parallel / one process: "
          f"{best['first load, one process'] / best['first load, parallel']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
