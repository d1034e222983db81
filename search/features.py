"""The frozen backbone's outputs, computed once and cached (the vgg16 study).

A frozen VGG16 maps an image to the same features in every trial, so they are computed once
per (weights and their sha256, input size, where the network is cut, the split's pixels,
torch and torchvision versions), in eval mode, batched, under the trainer's fast settings
(bf16 autocast on CUDA and on CPUs with native bf16), with a progress bar, and stored as
float16 in a search.cache ArrayStore beside the storage. Every trial then trains only its
head on them. The test split's features are made only when the final step asks for them.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from search.cache import ArrayStore, SizeBound, key_name, pixels_sha256
from search.models.vgg16 import FrozenVGG16, ImageNetInput, VGGWeights
from search.train import DeviceSplit, Speed

log = logging.getLogger(__name__)

BATCH = 256  # images per backbone pass
CUTS = {"exercise": "vgg16 classifier[:6] (4096)", "small": "vgg16 features (conv)"}


@dataclass
class FeatureCache:
    """Features of `splits` (name -> uint8 images [N, C, H, W], CPU) under `weights`."""

    splits: dict
    dataset: str
    weights: VGGWeights
    directory: Path | None
    device: torch.device
    computed: list = field(default_factory=list)  # (split, input size) passes this process ran
    bound: SizeBound | None = None  # the cache folder's size bound (--cache-max-gb)
    _memory: dict = field(default_factory=dict, repr=False)
    _pixels: dict = field(default_factory=dict, repr=False)  # split -> sha256 of its pixels

    def get(self, split: str, head: str, input_size: int) -> torch.Tensor:
        """float16 features [N, F] of `split` for a head of kind `head` at `input_size` px.
        A miss runs the backbone once for every cut (conv output, then on through the
        frozen classifier) and stores them all. Memory holds the features of the last head
        asked for only; another head's are read from the cache's folder."""
        slot = (split, head, input_size)
        if slot in self._memory:
            return self._memory[slot]
        images = self.splits[split]
        if split not in self._pixels:  # hashed once per split, not once per head
            self._pixels[split] = pixels_sha256(images)
        pixels = self._pixels[split]
        key = {"model": "vgg16", "input_size": int(input_size),
               "weights_sha256": self.weights.sha256, "dataset": self.dataset, "split": split,
               "n": int(images.shape[0]), "pixels_sha256": pixels, "torch": torch.__version__,
               "torchvision": _torchvision_version(), **backbone_settings(self.device)}
        names = {cut: key_name({**key, "cut": CUTS[cut]}) for cut in CUTS}
        started = time.perf_counter()

        def make() -> np.ndarray:
            self.computed.append((split, input_size))
            arrays = run_backbone(self.weights, images, input_size, self.device, split)
            if self.directory is not None:
                for cut, array in arrays.items():
                    if cut != head:  # the requested one is stored by get_or_make
                        ArrayStore(self.directory, self.bound).put(names[cut], array)
            return arrays[head]

        if self.directory is None:
            array, made = make(), True
        else:
            array, made = ArrayStore(self.directory, self.bound).get_or_make(names[head], make,
                                                                 dtype=np.float16)
        log.info("%s features of the %s split (%d x %d): %s in %.1f s", CUTS[head], split,
                 *array.shape, "computed" if made else "cache hit", time.perf_counter() - started)
        tensor = torch.from_numpy(array)
        # one head's features in memory (a trial trains one head; the other cut is on disk)
        self._memory = {kept: t for kept, t in self._memory.items() if kept[1] == head}
        self._memory[slot] = tensor
        return tensor


@torch.inference_mode()
def run_backbone(weights: VGGWeights, images: torch.Tensor, input_size: int,
                 device: torch.device, desc: str = "") -> dict:
    """Every cut's features (float16 arrays) of uint8 `images`, from one batched pass
    through the frozen VGG16 in eval mode."""
    model = FrozenVGG16(1, head="exercise", input_size=input_size, state=weights.state)
    model = model.to(device).eval()
    conv, rest = model.frozen[0], model.frozen[1:]  # vgg.features | avgpool ... [:6]
    speed = backbone_speed(device)
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    layout = torch.channels_last if speed.channels_last else torch.contiguous_format
    parts: dict = {cut: [] for cut in CUTS}
    for start in tqdm(range(0, len(images), BATCH), desc=f"vgg16 features {desc}",
                      unit="batch", file=sys.stderr, disable=None, leave=False):
        x = images[start:start + BATCH].to(device).float().div_(255.0)
        with torch.autocast(device.type, dtype=speed.autocast or torch.float32,
                            enabled=speed.autocast is not None):
            maps = conv(model.input(x).contiguous(memory_format=layout))
            pooled = rest(maps)
        for cut, out in (("small", maps.flatten(1)), ("exercise", pooled)):
            parts[cut].append(out.float().cpu().numpy().astype(np.float16))
    return {cut: np.concatenate(chunks) for cut, chunks in parts.items()}


def backbone_speed(device: torch.device) -> Speed:
    """The precision and layout the backbone runs at on `device` (the trainer's settings
    for a convolutional model there)."""
    return Speed.of(nn.Conv2d(1, 1, 1), device)


def backbone_settings(device: torch.device) -> dict:
    """What the cached features' bytes depend on besides weights, data and versions: the
    device kind, the precision and layout the backbone ran at, the images per pass, and the
    input preprocessing (ImageNet mean and std, the resize)."""
    speed = backbone_speed(device)
    return {"device": device.type, "autocast": str(speed.autocast or torch.float32),
            "channels_last": speed.channels_last, "batch": BATCH,
            "preprocess": ImageNetInput.describe()}


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def feature_split(cache: FeatureCache, split: str, head: str, input_size: int,
                  labels: torch.Tensor, device: torch.device) -> DeviceSplit:
    """A split of cached features with its labels, on the training device."""
    return DeviceSplit(cache.get(split, head, input_size).to(device), labels.to(device))


def backbone_ms_per_image(weights: VGGWeights, input_size: int, images: torch.Tensor,
                          device: torch.device, n: int = 256) -> float:
    """Milliseconds per image of one pass through the frozen part, on `n` of `images`
    (what the cache saves every trial, every epoch): timed after a warm-up pass (cuDNN's
    kernel choice, CUDA's start, the first allocations), to the end of the GPU's work."""
    run_backbone(weights, images[:min(n, 8)], input_size, device, "(warm-up)")
    _synchronize(device)
    started = time.perf_counter()
    run_backbone(weights, images[:n], input_size, device, "(timing)")
    _synchronize(device)
    return 1000 * (time.perf_counter() - started) / max(1, min(n, len(images)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
