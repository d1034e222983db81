"""python benchmarks/trial_latency.py [--study cnn] [--configs 12] [--threads 1]

What timing each trial's latency costs, and what the two runtimes rank. For --configs
configs drawn at random from the study's space (seed 0; the reference nets first), on the
CPU with --threads threads (a CPU worker's share: one), side by side in one process:

  counts        search.costs.measure without timing: what every trial pays anyway
  pytorch       --latency-runtime pytorch: the model in PyTorch, batch 1 and 64
  onnxruntime   --latency-runtime onnxruntime: exported (TorchScript exporter) and run in
                ONNX Runtime, batch 1 and 64

For each config: the seconds each took and the batch-1 milliseconds per image each
measured, then the medians, the runtimes' ratio, and Spearman's rank correlation of each
runtime's batch-1 latency with the config's multiply-adds (1: the latency orders configs as
their arithmetic does). The first export of a process also pays PyTorch's ONNX imports; it
is timed apart, as every worker pays it once. Not a test: timings on a shared machine are
noisy. Takes about a second per config and runtime for the cnn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties at their mean rank)."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("mlp", "cnn"), default="cnn")
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)
    import optuna
    import torch

    from search import costs, registry

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(args.threads)
    spec = registry.get(args.study)
    shape, classes = (1, 28, 28), 10
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for reference in spec.references.values():
        study.enqueue_trial(spec.to_trial_params(reference))
    configs = []
    while len(configs) < args.configs:
        params = spec.suggest(study.ask())
        try:
            costs.measure(spec, params, shape, classes)
        except ValueError:  # does not fit 28 x 28 images: the search prunes it at once
            continue
        configs.append(params)

    start = time.perf_counter()
    costs.measure(spec, configs[0], shape, classes, timed_on=torch.device("cpu"),
                  runtime="onnxruntime")
    print(f"first export of the process (imports included): "
          f"{time.perf_counter() - start:.2f} s\n")
    print(f"{'config':>6} {'multiply-adds':>14} {'counts s':>9} {'pytorch s':>10} "
          f"{'onnxrt s':>9} {'pytorch ms':>11} {'onnxrt ms':>10}")
    rows = []
    for number, params in enumerate(configs):
        row = {}
        for arm, runtime in (("counts", None), ("pytorch", "pytorch"),
                             ("onnxruntime", "onnxruntime")):
            start = time.perf_counter()
            measured = costs.measure(spec, params, shape, classes,
                                     timed_on=None if runtime is None else torch.device("cpu"),
                                     runtime=runtime or "onnxruntime")
            row[f"{arm}_s"] = time.perf_counter() - start
            row[f"{arm}_ms"] = measured.latency_ms
            row["macs"] = measured.macs
        rows.append(row)
        print(f"{number:>6} {row['macs']:>14,} {row['counts_s']:>9.3f} {row['pytorch_s']:>10.3f} "
              f"{row['onnxruntime_s']:>9.3f} {row['pytorch_ms']:>11.4f} "
              f"{row['onnxruntime_ms']:>10.4f}")

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    macs = [r["macs"] for r in rows]
    print(f"\nmedian seconds per trial: counts {median('counts_s'):.3f}, pytorch "
          f"{median('pytorch_s'):.3f}, onnxruntime {median('onnxruntime_s'):.3f} "
          f"(onnxruntime / pytorch {median('onnxruntime_s') / median('pytorch_s'):.2f}x)")
    print(f"median batch-1 ms per image: pytorch {median('pytorch_ms'):.4f}, onnxruntime "
          f"{median('onnxruntime_ms'):.4f} (pytorch / onnxruntime "
          f"{median('pytorch_ms') / median('onnxruntime_ms'):.2f}x)")
    print(f"rank correlation with multiply-adds: pytorch "
          f"{spearman(macs, [r['pytorch_ms'] for r in rows]):.2f}, onnxruntime "
          f"{spearman(macs, [r['onnxruntime_ms'] for r in rows]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
