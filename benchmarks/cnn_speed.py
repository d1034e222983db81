"""python benchmarks/cnn_speed.py [--images 6400] [--repeat 3] [--device cpu]

One training epoch of two CNNs of the cnn study, through search.train.fit, under each
precision/layout setting, side by side in one process:

  lecture CNN: PyTorch's MNIST example net (the study's first reference trial)
  BN CNN:      three 3x3 blocks (32, 64, 128) with batch norm and max pooling after each

settings: float32 NCHW (plain PyTorch), float32 channels_last, bf16 autocast NCHW, bf16
autocast channels_last. Each runs --repeat times, interleaved; the fastest counts. Ratios
are against float32 NCHW; the last line is the speed-up of what search.train.Speed.of picks
on this device. Not a test: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from search.models import CNN
from search.train import DeviceSplit, Speed, fit, make_optimizer

ARCHS = {
    "lecture CNN": dict(channels=(32, 64), padding="valid", pool_at="last", dropout="both",
                        conv_dropout_rate=0.25, head_dropout_rate=0.5),
    "BN CNN": dict(channels=(32, 64, 128), batch_norm=True),
}
SETTINGS = {
    "float32 NCHW": Speed(False, None),
    "float32 channels_last": Speed(True, None),
    "bf16 NCHW": Speed(False, torch.bfloat16),
    "bf16 channels_last": Speed(True, torch.bfloat16),
}


def epoch_seconds(arch: dict, speed: Speed, split: DeviceSplit, device) -> float:
    torch.manual_seed(0)
    model = CNN((1, 28, 28), n_classes=10, **arch).to(device)
    history = fit(model, nn.CrossEntropyLoss(), make_optimizer("adam", model, 1e-3), split,
                  split, epochs=1, batch_size=128, seed=0, speed=speed)
    return history[0].seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=generator)
    split = DeviceSplit(x.to(device), torch.randint(0, 10, (args.images,),
                                                     generator=generator).to(device))
    picked = {name: Speed.of(CNN((1, 28, 28), n_classes=10, **arch), device)
              for name, arch in ARCHS.items()}
    print(f"one epoch of {args.images} 28x28 images, batch 128, on {device} "
          f"({torch.get_num_threads()} threads), fastest of {args.repeat}")
    gains = []
    for name, arch in ARCHS.items():
        best = {setting: float("inf") for setting in SETTINGS}
        for _ in range(args.repeat):
            for setting, speed in SETTINGS.items():
                best[setting] = min(best[setting], epoch_seconds(arch, speed, split, device))
        base = best["float32 NCHW"]
        choice = next((s for s, v in SETTINGS.items() if v == picked[name]), "float32 NCHW")
        for setting, seconds in best.items():
            mark = "  <- search.train picks this" if setting == choice else ""
            print(f"{name:12} {setting:22} {seconds:6.2f} s  {base / seconds:4.2f}x{mark}")
        gains.append(base / best[choice])
    print("speed-up of the picked setting over float32 NCHW: "
          + ", ".join(f"{n} {g:.2f}x" for n, g in zip(ARCHS, gains, strict=True)))


if __name__ == "__main__":
    main()
