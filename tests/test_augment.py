"""Augmentation: identity at strength 0, reproducible from the seed, and the shared cache."""

from __future__ import annotations

import multiprocessing

import albumentations as A
import numpy as np
import pytest
import torch

from search import augment
from search.augment import FAMILIES, AugmentCache, AugmentSpec, EpochImages
from tests.conftest import make_images


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    x, _ = make_images(64, seed=5)
    return x[:, None]  # [N, 1, 28, 28] uint8


@pytest.mark.parametrize("spec", [AugmentSpec(0.0, FAMILIES), AugmentSpec(1.0, ())],
                         ids=["strength-0", "no-family"])
def test_strength_0_or_no_family_is_the_identity(images, spec):
    assert not spec.active
    assert np.array_equal(augment.augment(images, spec, seed=1), images)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_at_strength_1_changes_images_keeps_shape_and_dtype(images, family):
    out = augment.augment(images, AugmentSpec(1.0, (family,)), seed=1)
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = (out != images).reshape(len(images), -1).any(axis=1).mean()
    assert changed > 0.2, f"{family} changed only {changed:.0%} of the images"


def test_strength_scales_how_much_changes(images):
    def change(strength):
        out = augment.augment(images, AugmentSpec(strength, FAMILIES), seed=2)
        return np.abs(out.astype(int) - images).mean()

    assert 0 < change(0.25) < change(1.0)


def test_same_seed_same_images_other_seed_other_images(images):
    spec = AugmentSpec(0.75, FAMILIES)
    first = augment.augment(images, spec, seed=7)
    assert np.array_equal(first, augment.augment(images, spec, seed=7))
    assert not np.array_equal(first, augment.augment(images, spec, seed=8))


def test_no_flips_and_rotation_at_most_15_degrees():
    def leaves(transform):
        inner = getattr(transform, "transforms", None)
        return [t for child in inner for t in leaves(child)] if inner else [transform]

    transforms = leaves(augment.pipeline(AugmentSpec(1.0, FAMILIES), seed=0))
    names = {type(t).__name__ for t in transforms}
    assert not any("Flip" in name or "Transpose" in name for name in names)
    affine = next(t for t in transforms if isinstance(t, A.Affine))
    assert max(abs(v) for v in affine.rotate) <= 15


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        AugmentSpec(1.5, ("blur",))
    with pytest.raises(ValueError, match="unknown augmentation families"):
        AugmentSpec(0.5, ("flip",))


def test_chunks_in_several_processes_give_the_same_pixels(images, monkeypatch):
    monkeypatch.setattr(augment, "CHUNK", 16)  # 64 images: 4 chunks
    spec = AugmentSpec(1.0, FAMILIES)
    alone = augment.augment(images, spec, seed=3)
    assert np.array_equal(augment.augment(images, spec, 3, processes=2), alone)


# --- the cache ---------------------------------------------------------------------------

KEY = {"dataset": "test", "n_train": 64}
SPEC = AugmentSpec(0.5, ("affine", "blur"))


def _cache(images, directory, key=KEY):
    return AugmentCache(torch.from_numpy(images), dict(key), directory)


def test_a_copy_is_made_once_then_read_from_disk_and_memory(images, tmp_path):
    first = _cache(images, tmp_path)
    made = first.copy(SPEC, 0)
    assert first.stats.generated == 1 and made.shape == images.shape
    assert first.copy(SPEC, 0) is made and first.stats.from_memory == 1
    second = _cache(images, tmp_path)  # another trial process
    assert torch.equal(second.copy(SPEC, 0), made)
    assert second.stats.from_disk == 1 and second.stats.generated == 0
    assert not torch.equal(second.copy(SPEC, 1), made)  # another copy index differs
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_changed_key_makes_a_new_copy(images, tmp_path):
    _cache(images, tmp_path).copy(SPEC, 0)
    other = _cache(images, tmp_path, key={**KEY, "dataset": "other"})
    other.copy(SPEC, 0)
    assert other.stats.generated == 1
    again = _cache(images, tmp_path)
    again.copy(AugmentSpec(0.75, SPEC.families), 0)
    assert again.stats.generated == 1


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "lose-digest"])
def test_a_damaged_file_is_made_again_never_trusted(images, tmp_path, damage):
    expected = _cache(images, tmp_path).copy(SPEC, 0).clone()
    array_file = next(tmp_path.glob("*.npy"))
    data = array_file.read_bytes()
    if damage == "truncate":
        array_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip-a-byte":
        array_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        next(tmp_path.glob("*.sha256")).unlink()
    fresh = _cache(images, tmp_path)
    assert torch.equal(fresh.copy(SPEC, 0), expected)
    assert fresh.stats.generated == 1 and fresh.stats.from_disk == 0
    assert array_file.read_bytes() == data  # the file is whole again


def test_the_real_key_misses_when_what_makes_the_bytes_changes(images, tmp_path,
                                                                 monkeypatch):
    """Through data_key and pipeline_digest, as trials make them: other pixels, another
    albumentations release or another pipeline() each miss; the same hit."""
    def real(pixels=images) -> AugmentCache:
        return AugmentCache(torch.from_numpy(pixels), None, tmp_path, dataset="mnist")

    made = real().copy(SPEC, 0)
    same = real()
    assert torch.equal(same.copy(SPEC, 0), made) and same.stats.generated == 0
    other_pixels = images.copy()
    other_pixels[0, 0, 0, 0] ^= 1
    changed = real(other_pixels)
    changed.copy(SPEC, 0)
    assert changed.stats.generated == 1
    with monkeypatch.context() as patched:
        patched.setattr(A, "__version__", "2.0.999")
        newer = real()
        newer.copy(SPEC, 0)
        assert newer.stats.generated == 1
    real_pipeline = augment.pipeline

    def wider_rotation(spec, seed, size=28, flips=False):  # an edit to pipeline(), nothing bumped
        compose = real_pipeline(spec, seed, size, flips)
        for transform in compose.transforms:
            if isinstance(transform, A.Affine):
                transform.rotate = (-20.0, 20.0)
        return compose

    augment.pipeline_digest.cache_clear()
    with monkeypatch.context() as patched:
        patched.setattr(augment, "pipeline", wider_rotation)
        edited = real()
        edited.copy(SPEC, 0)
        assert edited.stats.generated == 1
    augment.pipeline_digest.cache_clear()
    assert real().copy(SPEC, 0).equal(made)


class _SlowMaker:
    """augment() that waits before making, so that a process holding the lock is still
    making when the others ask for the same copy."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.real = seconds, augment.augment

    def __call__(self, *args, **kwargs):
        import time

        time.sleep(self.seconds)
        return self.real(*args, **kwargs)


def _make_copy_in_a_process(args) -> tuple[int, int]:
    images, directory, barrier = args
    augment.augment = _SlowMaker(1.0)
    cache = _cache(images, directory)
    barrier.wait(timeout=120)  # every process asks at the same instant
    cache.copy(SPEC, 0)
    return cache.stats.generated, cache.stats.from_disk


def test_concurrent_workers_make_a_copy_once(images, tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(3)
        with context.Pool(3) as pool:
            counts = pool.map(_make_copy_in_a_process, [(images, tmp_path, barrier)] * 3)
    # one made it while the other two waited for the lock (the maker sleeps 1 s first),
    # then read what it wrote
    assert sorted(counts) == [(0, 1), (0, 1), (1, 0)]


def test_epoch_images_follow_the_trial_seed(images, tmp_path):
    cache = _cache(images, tmp_path)
    cpu = torch.device("cpu")

    def orders(seed, epochs):
        feed = EpochImages(cache, SPEC, seed, epochs, cpu)
        batches = [feed(e) for e in range(1, epochs + 1)]
        return [next(i for i in range(augment.COPIES) if torch.equal(b, cache.copy(SPEC, i)))
                for b in batches], feed

    first, feed = orders(seed=11, epochs=8)
    assert first == orders(seed=11, epochs=8)[0]
    assert len(feed.seen) == augment.COPIES  # 8 epochs cycle through every copy
    assert first[:augment.COPIES] != orders(seed=12, epochs=8)[0][:augment.COPIES] or (
        first != orders(seed=13, epochs=8)[0])
    two, feed = orders(seed=11, epochs=2)
    assert len(feed.seen) == 2  # a 2-epoch trial sees 2 copies
    assert cache.epoch_images(AugmentSpec(), 1, 4, cpu) is None  # no augmentation: no feed


def test_flips_only_when_the_classes_are_mirror_invariant():
    import albumentations as A

    spec = augment.AugmentSpec(1.0, ("contrast",))
    kinds = {type(t) for t in augment.pipeline(spec, 0, 28).transforms}
    flipped = {type(t) for t in augment.pipeline(spec, 0, 28, flips=True).transforms}
    assert A.HorizontalFlip not in kinds and A.HorizontalFlip in flipped
    assert augment.pipeline_digest(spec, 28) != augment.pipeline_digest(spec, 28, True)
    images = np.zeros((64, 3, 12, 12), np.uint8)
    images[:, :, :, :3] = 255  # a bright left edge
    mirrored = augment.augment(images, augment.AugmentSpec(1.0, ("blur",)), 0, flips=True)
    assert 0 < (mirrored[:, :, :, -1] > 128).all(axis=(1, 2)).sum() < 64  # some, not all
