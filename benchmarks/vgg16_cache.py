"""python benchmarks/vgg16_cache.py [--data mnist-5k] [--epochs 3] [--weights none]

Seconds per vgg16 trial (the exercise head: classifier[6] replaced, 3 epochs), side by side
on the same data in one process:

  cached:   what a trial does: the frozen backbone's outputs for the training and validation
            splits come from search.features (made once, before the first trial, in a
            fresh cache directory: that one-off cost is printed too), and only the head
            trains on them
  backbone: the same trial without the cache: the whole FrozenVGG16 trains on images, so the
            frozen backbone runs forward on every batch and every validation pass

Both use search.train.fit with its fast settings (bf16 autocast + channels_last for the
backbone where the device has them). The last line is the ratio backbone / cached. Not a
test: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from search import data as data_module
from search import registry
from search.features import FeatureCache, feature_split
from search.models.vgg16 import resolve_weights
from search.train import DeviceSplit, train_built
from spaces import vgg16 as vgg16_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    sys.stdout.reconfigure(line_buffering=True)
    device = torch.device(args.device)
    dataset = data_module.load(args.data)
    weights = resolve_weights(args.weights)
    spec, params = registry.get("vgg16"), vgg16_space.EXERCISE
    n_classes = len(dataset.classes)
    print(f"vgg16 exercise head, {args.epochs} epochs, {dataset.name}: {len(dataset.train)} "
          f"train / {len(dataset.val)} val images at {args.input_size} px, weights "
          f"{weights.kind}, {device} ({torch.get_num_threads()} threads)")

    cache = FeatureCache({"train": dataset.train.x, "val": dataset.val.x}, dataset.name,
                         weights, Path(tempfile.mkdtemp(prefix="vgg16-cache-")), device)
    started = time.perf_counter()
    for split in ("train", "val"):
        cache.get(split, params.head, args.input_size)
    print(f"once per study: backbone over train + val, every cut: "
          f"{time.perf_counter() - started:.1f} s")

    def cached_trial() -> float:
        started = time.perf_counter()
        train, val = (feature_split(cache, name, params.head, args.input_size, split.y,
                                    device)
                      for name, split in (("train", dataset.train), ("val", dataset.val)))
        torch.manual_seed(0)
        built = spec.build_head(params, train.x.shape[1], n_classes)
        built.model.to(device)
        history = train_built(built, train, val, epochs=args.epochs, batch_size=128, seed=0)
        print(f"cached:   {time.perf_counter() - started:7.2f} s, val accuracy "
              f"{history[-1].val_accuracy:.4f}")
        return time.perf_counter() - started

    def backbone_trial() -> float:
        started = time.perf_counter()
        torch.manual_seed(0)
        built = spec.build(params, dataset.image_shape, n_classes, None, None,
                           weights_state=weights.state, input_size=args.input_size)
        built.model.to(device)
        history = train_built(built, DeviceSplit.of(dataset.train, device),
                              DeviceSplit.of(dataset.val, device), epochs=args.epochs,
                              batch_size=128, seed=0)
        print(f"backbone: {time.perf_counter() - started:7.2f} s, val accuracy "
              f"{history[-1].val_accuracy:.4f}")
        return time.perf_counter() - started

    cached = min(cached_trial(), cached_trial())  # the fastest of two (least disturbed)
    backbone = backbone_trial()
    print(f"seconds per trial: cached {cached:.2f}, backbone every epoch {backbone:.2f}")
    print(f"feature cache speed-up: {backbone / cached:.1f}x per trial (backbone / cached)")


if __name__ == "__main__":
    main()
