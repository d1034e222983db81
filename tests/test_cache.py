"""search.cache: the size bound of the arrays many trials share (--cache-max-gb)."""

from __future__ import annotations

import os
import time

import numpy as np

from search.cache import ArrayStore, SizeBound


def _sized(kb: int, fill: int) -> np.ndarray:
    return np.full(kb * 1024, fill, dtype=np.uint8)


def test_the_least_recently_used_arrays_go_first_never_the_new_one(tmp_path):
    """Four 100 KB arrays in two folders under one bound of 350 KB: writing a fifth removes
    the two least recently used (by last write or read), not the one read since, and never
    the one just written."""
    bound = SizeBound(tmp_path, 350 * 1024)
    augment, features = ArrayStore(tmp_path / "augment"), ArrayStore(tmp_path / "features")
    past = time.time() - 1000
    for i, (store, name) in enumerate([(augment, "a0"), (augment, "a1"), (features, "f0"),
                                       (features, "f1")]):
        store.put(name, _sized(100, i))  # no bound yet: all four are kept
        os.utime(store.paths(name)[0], (past + i, past + i))  # written in this order
    assert augment.read("a0") is not None  # used now: the most recent of the four
    bounded = ArrayStore(tmp_path / "features", bound)
    bounded.put("f2", _sized(100, 9))
    left = sorted(p.stem for p in tmp_path.rglob("*.npy"))
    assert left == ["a0", "f1", "f2"]  # a1 and f0 were the least recently used
    assert sorted(p.stem for p in tmp_path.rglob("*.sha256")) == left  # digests with them
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.npy")) <= 350 * 1024
    assert augment.read("a1") is None  # gone: a reader makes it again


def test_an_array_larger_than_the_bound_is_kept_alone(tmp_path):
    store = ArrayStore(tmp_path, SizeBound(tmp_path, 50 * 1024))
    store.put("small", _sized(10, 1))
    store.put("large", _sized(100, 2))
    assert [p.stem for p in tmp_path.rglob("*.npy")] == ["large"]
    assert store.read("large") is not None


def test_gigabytes():
    assert SizeBound.gigabytes("x", None) is None
    assert SizeBound.gigabytes("x", 1.5).max_bytes == 3 * 2**29


def test_the_search_and_the_final_step_keep_their_caches_within_the_flag(digits, tmp_path):
    import torch

    from search import registry
    from search.config import RunConfig
    from search.objective import Objective

    cfg = RunConfig(study="mlp", data="digits", storage=f"sqlite:///{tmp_path / 's.db'}",
                    cache_max_gb=0.5)
    objective = Objective(registry.get("mlp"), digits, cfg, torch.device("cpu"))
    assert objective.augment.bound == SizeBound(tmp_path / "s-cache", 2**29)
