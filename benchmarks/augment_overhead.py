"""python benchmarks/augment_overhead.py [--data mnist-5k] [--trials 8] [--epochs 8]

What the searched augmentation costs a cnn study: the same trials, with the same epochs,
run twice side by side in one process, interleaved trial by trial:

  searched: a real cnn study (TPE, seeded, the lecture and exercise CNNs first), each trial
            with the augmentation strength and families it drew, copies made by
            search.augment's cache in a fresh, empty cache directory (so the cost of making
            them is counted, not only of reusing them)
  off:      the same params with augmentation strength 0, in a second study

Both go through search.objective.Objective exactly as `python -m search.run` does, with no
pruner (so every trial runs every epoch in both arms). The last line is the ratio of total
wall time, searched / off. Not a test: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch

import storage
from search import data as data_module
from search import registry
from search.config import RunConfig
from search.objective import Objective
from search.study import open_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    sys.stdout.reconfigure(line_buffering=True)  # a line per trial, also into a file
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    spec = registry.get("cnn")
    dataset = data_module.load(args.data)
    folder = Path(tempfile.mkdtemp(prefix="augment-overhead-"))
    device = torch.device("cpu")
    studies, objectives = {}, {}
    for arm in ("searched", "off"):
        cfg = RunConfig(study="cnn", data=args.data, n_trials=args.trials, epochs=args.epochs,
                        storage=f"sqlite:///{folder / arm}.db", seed=args.seed, pruner="none",
                        final=False, cache_dir=str(folder / f"{arm}-cache"))
        opened = storage.open(cfg.storage)
        if arm == "searched":  # as search.run makes it: references first, then TPE
            studies[arm] = open_study(cfg, spec, dataset, opened, f"bench-{arm}")
        else:  # only ever runs the params enqueued below
            studies[arm] = optuna.create_study(storage=opened, study_name=f"bench-{arm}",
                                               direction="maximize",
                                               pruner=optuna.pruners.NopPruner())
        objectives[arm] = Objective(spec, dataset, cfg, device)
    print(f"{args.trials} cnn trials x {args.epochs} epochs on {dataset.name} "
          f"({len(dataset.train)} training images), {torch.get_num_threads()} threads; "
          f"cache {folder}")
    print(f"{'trial':>5}  {'augmentation':<46} {'searched s':>10} {'off s':>7} {'ratio':>6}")
    totals = {"searched": 0.0, "off": 0.0}
    for number in range(args.trials):
        started = time.perf_counter()
        studies["searched"].optimize(objectives["searched"], n_trials=1)
        seconds = {"searched": time.perf_counter() - started}
        finished = [t for t in studies["searched"].trials if t.datetime_complete]
        trial = max(finished, key=lambda t: t.datetime_complete)
        plain = {k: v for k, v in trial.params.items() if not k.startswith("aug_")}
        studies["off"].enqueue_trial({**plain, "aug_strength": 0.0})
        started = time.perf_counter()
        studies["off"].optimize(objectives["off"], n_trials=1)
        seconds["off"] = time.perf_counter() - started
        for arm in totals:
            totals[arm] += seconds[arm]
        drawn = spec.suggest(optuna.trial.FixedTrial(trial.params)).augment.describe()
        copies = trial.user_attrs.get("augment_copies_seen", 0)
        print(f"{number:>5}  {drawn[:36]:<36} {copies} copies {seconds['searched']:>10.1f} "
              f"{seconds['off']:>7.1f} {seconds['searched'] / seconds['off']:>6.2f}")
    stats = objectives["searched"].augment.stats
    print(f"augmented copies: {stats.generated} made, {stats.from_memory + stats.from_disk} "
          f"reused; {stats.seconds:.1f} s making or loading them")
    print(f"total: searched augmentation {totals['searched']:.1f} s, off {totals['off']:.1f} s")
    print(f"augmentation overhead: {totals['searched'] / totals['off']:.2f}x "
          "(searched augmentation / off, same trials and epochs)")


if __name__ == "__main__":
    main()
