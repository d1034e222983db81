"""python benchmarks/pareto_pruning.py [--study cnn] [--data mnist-5k] [--data-dir DIR]
    [--budget 120] [--seeds 3] [--objectives accuracy,params]
    [--arms peers,none] [--variant NAME='FLAGS' ...]

What pruning among cost peers saves a search of accuracy against size. Each arm runs
`python -m search.run --study STUDY --objectives accuracy,params --no-final` for the same
wall-clock budget (--timeout), once per seed, one run at a time, seeds interleaved, in a
fresh process with the data cache filled beforehand:

  peers   the default pruner of a Pareto search (`--pruner sha`: successive halving among
          the trials that cost no more, search.study.CostPeerHalving)
  none    `--pruner none`: every trial trains all its epochs, as any Optuna study of
          several objectives must (Optuna prunes none)
  NAME    --variant NAME='--sampler random': the same command with those flags

--arms picks among peers and none (--arms peers: the variants against the default alone).

The measure is the hypervolume of the completed trials' front in (1 - validation accuracy,
log10 of the cost), to a reference point of error 1 and ten times the largest cost any
run of any arm completed, so that every run is measured to the same point; higher is
better. It is printed at the end of the budget and at each quarter of it (a trial counts
from the time it completed, the clock started with its process): the median and range over
seeds per arm, then each arm's median against the first arm's, side by side.

Not a test: the machine is shared and timings are noisy. Takes about
arms * seeds * (budget + 20 s).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 60  # past --timeout, before a run is interrupted (the search ends within seconds)
QUARTERS = (0.25, 0.5, 0.75, 1.0)


def hypervolume_2d(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area dominated by `points` (both coordinates minimized) and bounded by
    `reference`; points not below the reference on both count nothing."""
    inside = sorted((x, y) for x, y in points if x < reference[0] and y < reference[1])
    # by x ascending, each point lower than all before it adds the band between its y and
    # the lowest y so far, from its x to the reference
    area, lowest = 0.0, reference[1]
    for x, y in inside:
        if y < lowest:
            area += (reference[0] - x) * (lowest - y)
            lowest = y
    return area


def _run(flags: list[str], args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    """One search for args.budget seconds; its completed trials' (time, error, cost)."""
    import optuna

    db = workdir / "studies.db"
    command = [sys.executable, "-m", "search.run", "--study", args.study, "--data", args.data,
               "--storage", f"sqlite:///{db}", "--study-name", "bench", "--seed", str(seed),
               "--objectives", args.objectives, "--no-final", "--n-trials", "100000",
               "--timeout", str(args.budget), *flags]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    t0 = time.time()
    log = open(workdir / "run.log", "w", encoding="utf-8")  # noqa: SIM115 (the child's)
    with log:
        process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=log)
        try:
            process.wait(timeout=args.budget + GRACE_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            process.wait()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{db}")
    done, states = [], {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        if trial.state.name == "COMPLETE":
            done.append({"t": trial.datetime_complete.timestamp() - t0,
                         "error": 1.0 - trial.values[0], "cost": trial.values[1]})
    if process.returncode not in (0, 130):  # 130: interrupted past the grace period
        lines = (workdir / "run.log").read_text(encoding="utf-8").strip().splitlines()
        print(f"  run failed (exit code {process.returncode}): "
              f"{lines[-1] if lines else 'nothing logged'}", flush=True)
    return {"done": done, "states": states}


def _volume(run: dict, until: float, top_cost: float) -> float:
    # a latency is well under 1 ms
    points = [(p["error"], math.log10(max(p["cost"], 1e-9))) for p in run["done"]
              if p["t"] <= until]
    return hypervolume_2d(points, (1.0, math.log10(10 * top_cost)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("mlp", "cnn", "vgg16"), default="cnn")
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--data-dir")
    parser.add_argument("--budget", type=float, default=120.0, help="wall seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--objectives", default="accuracy,params",
                        help="accuracy and one cost: the hypervolume is two-dimensional")
    parser.add_argument("--arms", default="peers,none",
                        help="of peers,none; the first arm is the one the others divide")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                        help="another arm: search.run flags added to the command")
    args = parser.parse_args()
    if len(args.objectives.split(",")) != 2:
        parser.error("--objectives: accuracy and one cost, e.g. accuracy,params")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)
    known = {"peers": ["--pruner", "sha"], "none": ["--pruner", "none"]}
    chosen = [name for name in args.arms.split(",") if name]
    if not set(chosen) <= set(known):
        parser.error(f"--arms: of {', '.join(known)}, got {args.arms!r}")
    arms = {name: known[name] for name in chosen}
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        arms[name] = shlex.split(flags)
    if not arms:
        parser.error("no arm to run: name one in --arms or give a --variant")
    args.data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pareto-pruning-") as tmp:
        os.environ.update({"PYTHONPATH": os.pathsep.join(filter(None, [
            str(REPO), os.environ.get("PYTHONPATH")])),
            "SEARCH_CACHE_HOME": str(Path(tmp) / "cache-home")})
        sys.path.insert(0, str(REPO))
        from search import data as data_module

        data_module.load(args.data, args.data_dir)  # the data cache, filled for every arm
        for seed in range(args.seeds):
            for arm, flags in arms.items():
                workdir = Path(tmp) / f"{arm}-{seed}"
                workdir.mkdir()
                run = _run(flags, args, seed, workdir)
                runs[arm].append(run)
                print(f"seed {seed} {arm}: " + ", ".join(
                    f"{n} {s.lower()}" for s, n in sorted(run["states"].items()))
                    + f" ({time.perf_counter() - started:.0f} s so far)", flush=True)
    top = max((p["cost"] for rs in runs.values() for r in rs for p in r["done"]), default=1.0)
    print(f"\nhypervolume of (1 - validation accuracy, log10 {args.objectives.split(',')[1]})"
          f" to (1, log10 {10 * top:,.0f}); median [min-max] over {args.seeds} seeds, "
          f"budget {args.budget:g} s")
    width = max(len(a) for a in arms) + 2
    print("arm".ljust(width) + "".join(f"at {q * args.budget:>6.0f} s".rjust(24)
                                       for q in QUARTERS) + "   trials complete/pruned")
    medians = {}
    for arm, arm_runs in runs.items():
        cells, medians[arm] = [], []
        for q in QUARTERS:
            volumes = [_volume(r, q * args.budget, top) for r in arm_runs]
            medians[arm].append(statistics.median(volumes))
            cells.append(f"{medians[arm][-1]:.4f} [{min(volumes):.4f}-{max(volumes):.4f}]")
        counts = "/".join(str(statistics.median(r["states"].get(s, 0) for r in arm_runs))
                          for s in ("COMPLETE", "PRUNED"))
        print(arm.ljust(width) + "".join(c.rjust(24) for c in cells) + f"   {counts}")
    first = next(iter(arms))
    for arm in list(arms)[1:]:
        ratios = [f"{m / b:.2f}x" if b else "-" for m, b in zip(medians[first], medians[arm],
                                                                 strict=True)]
        print(f"{first} / {arm}".ljust(width) + "".join(r.rjust(24) for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
