"""python benchmarks/mlp_schedule.py [--data mnist-5k] [--data-dir DIR] [--epochs 5,10,20]

Does a learning-rate schedule help the mlp study? Trains the two reference nets (the
lecture's and the exercise's seed net, spaces/mlp.py) through the service's own trainer
with each schedule of search.train.SCHEDULES for each number of epochs, same seed, same
split, and prints the best validation accuracy of each. spaces/mlp.py searches the
schedules that won somewhere. Not a test: one seed, a few minutes on 54,000 images.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from search import data as data_module
from search import registry
from search.train import SCHEDULES, DeviceSplit, train_built
from spaces import mlp as space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", default="5,10,20")
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    dataset = data_module.load(args.data, args.data_dir)
    cpu = torch.device("cpu")
    train, val = DeviceSplit.of(dataset.train, cpu), DeviceSplit.of(dataset.val, cpu)
    print(f"{dataset.name}: {len(train):,} training images, {len(val):,} validation")
    print(f"{'net':8} {'epochs':>6} " + " ".join(f"{s:>10}" for s in SCHEDULES) + "  seconds")
    for name in ("lecture", "seed"):
        for epochs in (int(e) for e in args.epochs.split(",")):
            scores, started = [], time.perf_counter()
            for schedule in SCHEDULES:
                params = dataclasses.replace(space.REFERENCES[name], schedule=schedule)
                torch.manual_seed(0)
                built = registry.build_mlp(params, dataset.image_shape, len(dataset.classes),
                                           dataset.channel_mean, dataset.channel_std)
                history = train_built(built, train, val, epochs=epochs, batch_size=128,
                                      seed=0)
                scores.append(max(r.val_accuracy for r in history))
            print(f"{name:8} {epochs:6d} " + " ".join(f"{s:10.4f}" for s in scores)
                  + f"  {time.perf_counter() - started:7.1f}", flush=True)


if __name__ == "__main__":
    main()
