"""python benchmarks/epoch_throughput.py [--device cpu] [--workers 0]

One epoch of the same MLP (the lecture net, 784-512-256-10) at the same batch size over
60,000 synthetic 28x28 images, trained two ways side by side in one process:

  ours:     search.train.fit: uint8 images in one device tensor, batches sliced from a
            seeded permutation, converted and normalized per batch (inside the model)
  baseline: torchvision's classic pipeline: a Dataset of PIL images with
            ToTensor + Normalize per sample, batched by a DataLoader (shuffle=True)

Each side runs --repeat times, interleaved, and the fastest epoch of each counts (the least
disturbed by other load). The last line is the speed-up (baseline seconds / our seconds).
Not a test: the machine is shared and timings are noisy; run it when changing the trainer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from search.models import MLP
from search.train import DeviceSplit, fit, make_optimizer

N_IMAGES = 60_000
BATCH = 128
WIDTHS = (512, 256)


class PILDigits(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per item: a PIL image through the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def baseline_epoch(images, labels, mean, std, device, workers) -> float:
    torch.manual_seed(0)
    model = MLP(784, WIDTHS, 10).to(device)  # Normalize(0, 1): the transform normalizes
    optimizer = make_optimizer("adam", model, 1e-3)
    loss_fn = nn.CrossEntropyLoss()
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    loader = DataLoader(PILDigits(images, labels, pipeline), batch_size=BATCH, shuffle=True,
                        num_workers=workers)
    started = time.perf_counter()
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def our_epoch(images, labels, mean, std, device) -> float:
    torch.manual_seed(0)
    model = MLP(784, WIDTHS, 10, mean=mean, std=std).to(device)
    train = DeviceSplit(torch.from_numpy(images).unsqueeze(1).to(device),
                        torch.from_numpy(labels).to(device))
    val = DeviceSplit(train.x[:BATCH], train.y[:BATCH])  # fit scores val each epoch
    started = time.perf_counter()
    fit(model, nn.CrossEntropyLoss(), make_optimizer("adam", model, 1e-3), train, val,
        epochs=1, batch_size=BATCH, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--repeat", type=int, default=3, help="epochs timed per side")
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N_IMAGES, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=N_IMAGES).astype(np.int64)
    mean, std = float(images.mean() / 255), float(images.std() / 255)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {N_IMAGES} images, "
          f"batch {BATCH}, MLP 784-{'-'.join(map(str, WIDTHS))}-10, "
          f"DataLoader workers {args.workers}, fastest of {args.repeat}")
    our_epoch(images[:5000], labels[:5000], mean, std, device)  # warm-up: allocator, kernels
    ours_all, base_all = [], []
    for _ in range(args.repeat):
        ours_all.append(our_epoch(images, labels, mean, std, device))
        base_all.append(baseline_epoch(images, labels, mean, std, device, args.workers))
    ours, base = min(ours_all), min(base_all)
    print(f"ours:     {ours:7.2f} s/epoch  {N_IMAGES / ours:9.0f} images/s  "
          f"(all: {', '.join(f'{t:.2f}' for t in ours_all)})")
    print(f"baseline: {base:7.2f} s/epoch  {N_IMAGES / base:9.0f} images/s  "
          f"(all: {', '.join(f'{t:.2f}' for t in base_all)})")
    print(f"speed-up (baseline / ours): {base / ours:.1f}x")


if __name__ == "__main__":
    main()
