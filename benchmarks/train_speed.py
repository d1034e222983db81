"""python benchmarks/train_speed.py [--images 6400] [--repeat 3] [--threads N] [--device cpu]

One training epoch of mlp-study and cnn-study nets through search.train.fit, under each
precision / layout / optimizer-kernel setting, side by side in one process:

  mlp lecture      (512, 256), the mlp study's first reference config
  mlp seed         (512, 256, 128), the exercise's seed net
  mlp wide         (1024, 1024, 1024), the widest the mlp space draws
  mlp small        (128, 64)
  cnn lecture      PyTorch's MNIST example net (the cnn study's first reference trial)
  cnn BN           three 3x3 blocks (32, 64, 128) with batch norm and max pooling after each

Settings: float32 (plain PyTorch), bf16 autocast, channels_last (convolutional nets only),
and "fused": Adam's fused kernel (one pass over every parameter per step) instead of its
per-parameter loop. Each runs --repeat times, interleaved; the fastest counts. Ratios are
against float32; the marked row and the last line are what search.train.Speed.of picks on
this device. --threads defaults to 1: a CPU worker of the service trains single-threaded.
Not a test: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from search.models import CNN, MLP
from search.train import DeviceSplit, Speed, fit, make_optimizer

BF16 = torch.bfloat16
NETS = {
    "mlp lecture": lambda: MLP(784, (512, 256), 10),
    "mlp seed": lambda: MLP(784, (512, 256, 128), 10),
    "mlp wide": lambda: MLP(784, (1024, 1024, 1024), 10),
    "mlp small": lambda: MLP(784, (128, 64), 10),
    "cnn lecture": lambda: CNN((1, 28, 28), (32, 64), 10, padding="valid", pool_at="last",
                               dropout="both", conv_dropout_rate=0.25, head_dropout_rate=0.5),
    "cnn BN": lambda: CNN((1, 28, 28), (32, 64, 128), 10, batch_norm=True),
}
FLAT = {"float32": Speed(), "float32 fused": Speed(fused=True), "bf16": Speed(False, BF16),
        "bf16 fused": Speed(False, BF16, True)}
LAYOUTS = {"float32 channels_last": Speed(True), "bf16 channels_last": Speed(True, BF16),
           "bf16 channels_last fused": Speed(True, BF16, True)}


def epoch_seconds(make, speed: Speed, split: DeviceSplit, device) -> float:
    torch.manual_seed(0)
    model = make().to(device)
    optimizer = make_optimizer("adam", model, 1e-3, fused=speed.fused)
    history = fit(model, nn.CrossEntropyLoss(), optimizer, split, split, epochs=1,
                  batch_size=128, seed=0, speed=speed)
    return history[0].seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated, of: "
                        + ", ".join(NETS))
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=generator)
    split = DeviceSplit(x.to(device), torch.randint(0, 10, (args.images,),
                                                     generator=generator).to(device))
    print(f"one epoch of {args.images} 28x28 images, batch 128, Adam, on {device} "
          f"({torch.get_num_threads()} threads), fastest of {args.repeat}")
    gains = []
    for name in args.nets.split(","):
        make = NETS[name]
        settings = FLAT | (LAYOUTS if name.startswith("cnn") else {})
        picked = Speed.of(make(), device)
        best = {setting: float("inf") for setting in settings}
        for _ in range(args.repeat):
            for setting, speed in settings.items():
                best[setting] = min(best[setting], epoch_seconds(make, speed, split, device))
        base = best["float32"]
        choice = next((s for s, v in settings.items() if v == picked), None)
        for setting, seconds in best.items():
            mark = "  <- search.train picks this" if setting == choice else ""
            print(f"{name:12} {setting:25} {seconds:6.2f} s  {base / seconds:4.2f}x{mark}",
                  flush=True)
        gains.append(f"{name} {base / best[choice]:.2f}x" if choice else f"{name} n/a")
    print("speed-up of the picked setting over float32: " + ", ".join(gains))


if __name__ == "__main__":
    main()
