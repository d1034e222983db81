"""Training-image augmentation of `python -m search.run --study cnn`, with albumentations.

One strength in [0, 1] scales every transform's range and probability; `families` says which
transforms are on. Strength 0 (or no family) is the identity. No flips and no rotation past
15 degrees: they turn digits into other digits (6/9, 2/5). Only the uint8 training split is
ever augmented; validation and test images are scored as they are.

Per-image albumentations costs about 0.5 ms per 28x28 image for the full pipeline on one
core (measured here), comparable to a small CNN's own epoch. So augmentation is done once
per *copy*, not once per epoch per trial: an `AugmentCache` makes `COPIES` augmented copies
of the training split for each (strength, families) and data set, keeps them on disk beside
the storage and in memory, and every trial that draws the same strength and families reuses
them. A trial trains epoch e on copy order[e % n], the order drawn from its seed, so the
images a trial saw follow from its seed; a copy's pixels follow from its key alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from search.cache import ArrayStore, SizeBound, key_name, pixels_sha256

log = logging.getLogger(__name__)

# Names are stored in studies: never rename one.
FAMILIES = ("contrast", "blur", "affine", "dropout", "distort")
# Strength is searched on these levels, so trials share augmented copies (see module doc).
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
COPIES = 4  # distinct augmented copies of the training split per (strength, families)
CHUNK = 4096  # images per seeded chunk; fixes the result whatever the number of processes
MEMORY_COPIES = 12  # copies kept in memory per process (mnist: 54k images = 42 MB each)


@dataclass(frozen=True)
class AugmentSpec:
    strength: float = 0.0
    families: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augmentation strength must be in [0, 1], got {self.strength}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown augmentation families {sorted(unknown)}; "
                             f"known: {', '.join(FAMILIES)}")

    @property
    def active(self) -> bool:
        return self.strength > 0 and bool(self.families)

    def describe(self) -> str:
        if not self.active:
            return "none"
        return f"strength {self.strength:g}: {', '.join(self.families)}"


def pipeline(spec: AugmentSpec, seed: int, size: int = 28, flips: bool = False):
    """The albumentations Compose for `spec`, seeded; each transform's range and
    probability grow linearly with the strength s. Ranges in pixels are set for 28 px
    images and scaled to `size` (a 3x3 blur wipes out an 8 px digit). Left-right flips
    (half the images) only with `flips` (--augment-flips: mirror-invariant classes)."""
    import albumentations as A
    import cv2

    s, scale = spec.strength, min(size / 28, 1.0)
    blurs = [A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.1 + 0.9 * s * scale))]
    if size >= 16:
        blurs.append(A.MotionBlur(blur_limit=(3, 3)))
    make = {
        "contrast": lambda: A.RandomBrightnessContrast(
            brightness_limit=0.4 * s, contrast_limit=0.4 * s, p=0.8 * s),
        "blur": lambda: A.OneOf(blurs, p=0.5 * s),
        # rotation at most 15 degrees at strength 1; no flips anywhere
        "affine": lambda: A.Affine(
            translate_percent=(-0.1 * s, 0.1 * s), scale=(1 - 0.15 * s, 1 + 0.15 * s),
            rotate=(-15 * s, 15 * s), shear=(-8 * s, 8 * s), border_mode=cv2.BORDER_CONSTANT,
            fill=0, p=0.8 * s),
        "dropout": lambda: A.CoarseDropout(
            num_holes_range=(1, 1 + round(2 * s)), hole_height_range=(0.1, 0.1 + 0.15 * s),
            hole_width_range=(0.1, 0.1 + 0.15 * s), fill=0, p=0.5 * s),
        "distort": lambda: A.OneOf([
            A.ElasticTransform(alpha=(1 + 2 * s) * scale, sigma=max(3 * scale, 1.0),
                               border_mode=cv2.BORDER_CONSTANT),
            A.GridDistortion(num_steps=4, distort_limit=0.3 * s,
                             border_mode=cv2.BORDER_CONSTANT),
        ], p=0.5 * s),
    }
    # geometry first, so brightness and holes also cover the border an affine fills in
    order = ("affine", "distort", "contrast", "blur", "dropout")
    flip = [A.HorizontalFlip(p=0.5)] if flips else []
    return A.Compose(flip + [make[name]() for name in order if name in spec.families],
                     seed=seed)


def augment(images: np.ndarray, spec: AugmentSpec, seed: int,
            processes: int = 1, flips: bool = False) -> np.ndarray:
    """Augmented copy of uint8 `images` [N, C, H, W]; the identity when not spec.active.

    Images are augmented in chunks of CHUNK, each seeded from `seed` and its index, so the
    same (images, spec, seed) gives the same pixels in any process, with chunks spread
    over `processes` processes or not.
    """
    if not spec.active or not len(images):
        return images.copy()
    starts = range(0, len(images), CHUNK)
    jobs = [(images[start:start + CHUNK], spec, _chunk_seed(seed, start // CHUNK), flips)
            for start in starts]
    if processes <= 1 or len(jobs) < 2:
        return np.concatenate([_augment_chunk(*job) for job in jobs])
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context) as pool:
        return np.concatenate(list(pool.map(_augment_chunk, *zip(*jobs, strict=True))))


def _chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{chunk}".encode()).digest()[:4], "little")


def _augment_chunk(images: np.ndarray, spec: AugmentSpec, seed: int,
                   flips: bool = False) -> np.ndarray:
    import cv2

    cv2.setNumThreads(1)  # 28 px images: threads cost more than they save
    compose = pipeline(spec, seed, min(images.shape[2:]), flips)
    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # albumentations wants HWC
    out = np.stack([compose(image=image)["image"].reshape(image.shape) for image in hwc])
    return out.transpose(0, 3, 1, 2)


def data_key(images: torch.Tensor, dataset: str) -> dict:
    """What a copy depends on besides the spec's pipeline (pipeline_digest): the exact pixels
    of the training split (its sha256 covers the data set, the split and the files it came
    from), the library, and how the split is cut into separately seeded chunks."""
    import albumentations

    return {"dataset": dataset, "n_train": int(images.shape[0]),
            "train_sha256": pixels_sha256(images),
            "albumentations": albumentations.__version__, "chunk": CHUNK}


@functools.lru_cache(maxsize=256)
def pipeline_digest(spec: AugmentSpec, size: int, flips: bool = False) -> str:
    """sha256 of albumentations' own serialization of the pipeline `spec` makes for images
    of `size` px (every transform, its ranges and probability; the seed is not in it): a
    change to pipeline() changes the cache key by itself."""
    import albumentations

    described = albumentations.to_dict(pipeline(spec, 0, size, flips))
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()
                          ).hexdigest()


@dataclass
class CacheStats:
    generated: int = 0  # copies made by this process
    from_disk: int = 0
    from_memory: int = 0
    seconds: float = 0.0  # spent making or reading copies


@dataclass
class AugmentCache:
    """Augmented copies of one training split, by (spec, copy index); see the module doc.

    `directory` None keeps copies in memory only; on disk they are a search.cache
    ArrayStore (atomic, sha256-checked, one maker at a time).
    """

    images: torch.Tensor  # uint8 [N, C, H, W], on the CPU
    key: dict | None  # None: data_key(images, dataset), made when a copy is first needed
    directory: Path | None = None
    dataset: str = ""
    processes: int = 1
    bound: SizeBound | None = None  # the cache folder's size bound (--cache-max-gb)
    flips: bool = False  # --augment-flips
    stats: CacheStats = field(default_factory=CacheStats)
    _memory: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def for_dataset(cls, dataset, directory: Path | None, bound: SizeBound | None = None,
                    flips: bool = False) -> AugmentCache:
        """The cache of `dataset`'s training split (a search.data.Dataset); copies that
        span several chunks are made by as many processes as torch has threads."""
        return cls(dataset.train.x, None, directory, dataset=dataset.name,
                   processes=max(1, torch.get_num_threads()), bound=bound, flips=flips)

    def epoch_images(self, spec: AugmentSpec, seed: int, epochs: int,
                     device: torch.device) -> EpochImages | None:
        """What fit(epoch_images=...) takes for a trial with `spec`; None without
        augmentation (fit then trains on the split itself)."""
        return EpochImages(self, spec, seed, epochs, device) if spec.active else None

    def copy(self, spec: AugmentSpec, index: int) -> torch.Tensor:
        """Copy `index` of the training split under `spec` (uint8, CPU)."""
        if not spec.active:
            return self.images
        name = self._name(spec, index)
        started = time.perf_counter()
        try:
            if name in self._memory:
                self._memory.move_to_end(name)
                self.stats.from_memory += 1
                return self._memory[name]
            tensor = torch.from_numpy(self._load_or_make(spec, index, name))
            self._memory[name] = tensor
            while len(self._memory) > MEMORY_COPIES:
                self._memory.popitem(last=False)
            return tensor
        finally:
            self.stats.seconds += time.perf_counter() - started

    def _name(self, spec: AugmentSpec, index: int) -> str:
        if self.key is None:  # studies that never augment never hash the pixels
            self.key = data_key(self.images, self.dataset)
        return key_name({**self.key, "strength": spec.strength,
                         "families": sorted(spec.families), "copy": index,
                         "pipeline": pipeline_digest(spec, min(self.images.shape[2:]),
                                                     self.flips)})

    def _load_or_make(self, spec: AugmentSpec, index: int, name: str) -> np.ndarray:
        seed = int(name[:8], 16)  # from the key: every trial and worker gets the same copy

        def make() -> np.ndarray:
            return augment(self.images.numpy(), spec, seed, self.processes, self.flips)

        if self.directory is None:
            self.stats.generated += 1
            return make()
        array, made = ArrayStore(self.directory, self.bound).get_or_make(
            name, make, tuple(self.images.shape), np.uint8)
        if made:
            self.stats.generated += 1
        else:
            self.stats.from_disk += 1
        return array


@dataclass
class EpochImages:
    """The training images of each epoch of one trial: `fit(epoch_images=...)` calls it.

    Epoch e (1-based) uses copy order[(e - 1) % n] with n = min(epochs, COPIES) and the
    order a permutation drawn from the trial's seed.
    """

    cache: AugmentCache
    spec: AugmentSpec
    seed: int
    epochs: int
    device: torch.device
    seen: set = field(default_factory=set)

    def __post_init__(self) -> None:
        n = min(self.epochs, COPIES)
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))

    def __call__(self, epoch: int) -> torch.Tensor:
        index = int(self.order[(epoch - 1) % len(self.order)])
        if self.spec.active:
            self.seen.add(index)
        return self.cache.copy(self.spec, index).to(self.device, non_blocking=True)


def grid_images(images: torch.Tensor, strengths: Sequence[float], families: Sequence[str],
                seed: int = 0) -> list[np.ndarray]:
    """The same images at each strength (for the report's picture)."""
    array = images.numpy()
    return [augment(array, AugmentSpec(float(s), tuple(families)), seed) for s in strengths]
