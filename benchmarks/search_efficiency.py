"""python benchmarks/search_efficiency.py [--study mlp|cnn] [--data mnist-5k] [--data-dir DIR]
    [--budget 80] [--seeds 3] [--target ACC] [--arms naive,expert,ours,random]
    [--variant NAME='FLAGS'] [--no-final-test]

How much sooner does a study's search find a model better than its reference configs,
against the scripts a user would otherwise write? Each arm searches the same space
(spaces/mlp.py or spaces/cnn.py) on the same data split for the same wall-clock budget,
once per seed, each run in a fresh process, one run at a time, seeds interleaved:

  naive   Optuna's PyTorch example pattern: a torchvision Dataset with per-sample
          ToTensor + Normalize, a DataLoader (shuffle, batch 128), TPESampler(seed), no
          pruner, a fixed 10 epochs per trial.
  expert  what a skilled user writes in an afternoon: the splits as normalized float32
          tensors in memory, batches sliced from a random permutation, TPESampler(seed),
          MedianPruner(), a fixed 10 epochs per trial; the service's own model builder
          (the same net family). For cnn it leaves augmentation out (the space's
          augmentation draws are ignored): no per-epoch image pipeline to write or pay for.
  ours    `python -m search.run --study STUDY --no-final` with this service's defaults,
          stopped by --timeout.
  random  the same command with --sampler random.
  NAME    --variant NAME='--pruner median --epochs 20': the same command with those flags
          (how the defaults were chosen: benchmarks/RESULTS.md, "Defaults").

A run's clock starts when its process is started (imports and data loading count, the data
cache of search.data filled beforehand for every arm alike); the time
of a validation score is when its epoch ended. Per arm: the median and range over seeds of
the time to the first epoch at or above the target validation accuracy, the median time of
the first validation score (the first epoch's end: no time to target is shorter), the best
validation accuracy within the budget, the trials finished within it, and (unless
--no-final-test) the test accuracy of each run's best config, retrained once after the runs
as the service's final step trains (its trainer, its epochs, seed 0; the expert's cnn
configs without augmentation, as it searched them). The target defaults to the best
validation accuracy of the reference configs (the space's REFERENCES, trained the same way)
plus 0.25 points, so reaching it means the search found something the references did not. The
last lines are the other arms' median time-to-target divided by ours ("> x" when that arm
missed the target in most seeds: its time is then at least the budget); for the naive and
expert scripts also the time ours had to reach the target by to meet the product's goals
(20x sooner than the naive script, 3x sooner than the expert's), beside its first score.

Not a test: the machine is shared and timings are noisy. Takes about
len(arms) * seeds * (budget + 15 s); the defaults about 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
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
# this checkout's service, not whichever one is installed: the runs (PYTHONPATH below) and the
# references must measure the same code, and a copy of the tree runs without an install
sys.path.insert(0, str(REPO))
FIXED_EPOCHS = 10  # the naive and expert scripts' epochs per trial (Optuna's example uses 10)
BATCH = 128
GRACE_S = 90  # how long a run may overrun its budget (its last trial) before it is stopped
TARGET_MARGIN = 0.0025
# the product's goals: its time to target this many times shorter than each script's
WANTED = {"naive": 20.0, "expert": 3.0}


# ---------------------------------------------------------------- the scripts a user writes


def _script_arm(arm: str, study: str, data: str, data_dir: str | None, seed: int,
                budget: float, t0: float, out: Path) -> None:
    """One run of the naive or expert script; writes its epoch events to `out`."""
    import dataclasses

    import optuna
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from search import data as data_module
    from search import registry
    from search.augment import AugmentSpec
    from search.train import DeviceSplit, evaluate_accuracy

    sys.path.insert(0, str(Path(__file__).parent))
    from epoch_throughput import PILDigits

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = registry.get(study)
    dataset = data_module.load(data, data_dir)  # the split every arm uses
    shape, n_classes = dataset.image_shape, len(dataset.classes)
    mean, std = float(dataset.channel_mean[0]), float(dataset.channel_std[0])
    events: list[dict] = []

    if arm == "naive":
        pipeline = transforms.Compose([transforms.ToTensor(),
                                       transforms.Normalize((mean,), (std,))])
        train_images = dataset.train.x.squeeze(1).numpy()
        val_images = dataset.val.x.squeeze(1).numpy()
        train_set = PILDigits(train_images, dataset.train.y.numpy(), pipeline)
        val_set = PILDigits(val_images, dataset.val.y.numpy(), pipeline)

        def train_epoch(model, optimizer, scheduler, loss_fn, generator):
            model.train()
            loader = DataLoader(train_set, batch_size=BATCH, shuffle=True, generator=generator)
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()

        def accuracy(model) -> float:
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in DataLoader(val_set, batch_size=1000):
                    correct += int((model(x).argmax(1) == y).sum())
            return correct / len(val_set)

        pruner = optuna.pruners.NopPruner()
    else:
        def normalized(x):
            return (x.float() / 255.0 - mean) / std

        train_x, train_y = normalized(dataset.train.x), dataset.train.y
        val = DeviceSplit(normalized(dataset.val.x), dataset.val.y)

        def train_epoch(model, optimizer, scheduler, loss_fn, generator):
            model.train()
            order = torch.randperm(len(train_y), generator=generator)
            for start in range(0, len(order), BATCH):
                index = order[start:start + BATCH]
                optimizer.zero_grad()
                loss_fn(model(train_x[index]), train_y[index]).backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()

        def accuracy(model) -> float:
            return evaluate_accuracy(model, val)

        pruner = optuna.pruners.MedianPruner()

    def script_params(trial: optuna.Trial):
        params = spec.suggest(trial)
        # the cnn space's augmentation draws are left out: the script trains on the split
        return dataclasses.replace(params, augment=AugmentSpec()) if spec.augments else params

    def objective(trial: optuna.Trial) -> float:
        params = script_params(trial)
        torch.manual_seed(trial.number)
        # the service's own model builder; the input is normalized outside it here (a cnn
        # config asking for the lecture's constants gets them, on the same normalized input)
        built = spec.build(params, shape, n_classes, (0.0,) * shape[0], (1.0,) * shape[0])
        optimizer = built.make_optimizer(built.model)
        # the space's learning-rate schedule, over every batch of the trial
        scheduler = built.make_scheduler(optimizer,
                                         FIXED_EPOCHS * math.ceil(len(dataset.train) / BATCH))
        generator = torch.Generator().manual_seed(trial.number)
        best = 0.0
        for epoch in range(1, FIXED_EPOCHS + 1):
            train_epoch(built.model, optimizer, scheduler, built.loss_fn, generator)
            value = accuracy(built.model)
            if not math.isfinite(value):
                raise optuna.TrialPruned()
            best = max(best, value)
            events.append({"t": time.time() - t0, "acc": value, "trial": trial.number})
            if time.time() - t0 >= budget:  # nothing after the budget counts: stop here
                trial.study.stop()
                raise optuna.TrialPruned()
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    def stop_at_budget(study, trial) -> None:
        if time.time() - t0 >= budget:
            study.stop()

    study = optuna.create_study(direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, timeout=max(1.0, budget - (time.time() - t0)),
                   callbacks=[stop_at_budget], catch=(RuntimeError, ValueError))
    finished = [{"t": (t.datetime_complete.timestamp() - t0), "state": t.state.name}
                for t in study.trials if t.datetime_complete]
    best = _best_within(study, t0, budget)
    out.write_text(json.dumps({
        "events": events, "finished": finished, "references": [],
        "best_params": None if best is None else spec.to_trial_params(
            script_params(optuna.trial.FixedTrial(best.params)))}), encoding="utf-8")


def _best_within(study, t0: float, budget: float):
    """The trial with the best validation score reported within the budget (a pruned
    trial's best epoch counts, as it does in the table), None when there is none."""
    best, score = None, -1.0
    for trial in study.trials:
        values = list(trial.intermediate_values.values())
        # the service's epoch end times; a script reports nothing after the budget
        ended = trial.user_attrs.get("epoch_ended")
        if ended is not None:
            values = [v for v, t in zip(values, ended, strict=False) if t - t0 <= budget]
        if values and max(values) > score:
            best, score = trial, max(values)
    return best


# ---------------------------------------------------------------- this service, its real CLI


def _service_arm(flags: list[str], study_kind: str, data: str, data_dir: str | None, seed: int,
                 budget: float, workdir: Path) -> dict:
    """`python -m search.run --study STUDY` for `budget` seconds; its epoch events read back
    from the study (each trial's `epoch_ended` wall times and intermediate values)."""
    import optuna

    db = workdir / f"s{seed}.db"
    command = [sys.executable, "-m", "search.run", "--study", study_kind, "--data", data,
               "--storage", f"sqlite:///{db}", "--study-name", "bench", "--seed", str(seed),
               "--no-final", "--n-trials", "100000", "--timeout", str(budget), *flags]
    if data_dir:
        command += ["--data-dir", data_dir]
    t0 = time.time()
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=open(workdir / f"s{seed}.log", "w", encoding="utf-8"))
    try:
        process.wait(timeout=budget + GRACE_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{db}")
    events, finished, references = [], [], []
    for trial in study.trials:
        ended = trial.user_attrs.get("epoch_ended", [])
        # a trial stopped mid-epoch has one more report than end times, never fewer
        for step, when in zip(sorted(trial.intermediate_values), ended, strict=False):
            events.append({"t": when - t0, "acc": trial.intermediate_values[step],
                           "trial": trial.number})
        if trial.datetime_complete and trial.state.name in ("COMPLETE", "PRUNED"):
            finished.append({"t": trial.datetime_complete.timestamp() - t0,
                             "state": trial.state.name})
        if trial.user_attrs.get("reference") and trial.state.name == "COMPLETE":
            references.append({"name": trial.user_attrs["reference"], "acc": trial.value})
    best = _best_within(study, t0, budget)
    return {"events": events, "finished": finished, "references": references,
            "best_params": None if best is None else best.params}


# ---------------------------------------------------------------- the bar to clear


class _Trainer:
    """Trains configs of `study` once, seed 0, as the service's final step does (its
    trainer, its epochs for this data, augmentation where a config asks for it): the
    reference configs for the target, each run's best config for its test accuracy."""

    def __init__(self, study: str, data: str, data_dir: str | None, cache: Path):
        import torch

        from search import augment, registry
        from search import data as data_module

        self.spec = registry.get(study)
        self.dataset = data_module.load(data, data_dir)
        self.augment = augment.AugmentCache.for_dataset(self.dataset, cache)
        self.epochs = registry.epochs_for(self.spec, len(self.dataset.train), BATCH)
        self.device = torch.device("cpu")

    def __call__(self, params, label: str) -> tuple[float, float]:
        """(best validation accuracy, test accuracy of that epoch's weights)."""
        from search.retrain import retrain

        result = retrain(self.spec, params, label, self.dataset, seeds=[0],
                         epochs=self.epochs, batch_size=BATCH, device=self.device,
                         augment=self.augment, progress=lambda line: None)
        if not result.runs:
            return math.nan, math.nan
        return result.runs[0].val_accuracy, result.runs[0].test["accuracy"]

    def flat(self, flat_params: dict):
        import optuna

        return self.spec.suggest(optuna.trial.FixedTrial(flat_params))


# ---------------------------------------------------------------- summary


def _summarize(runs: list[dict], budget: float, target: float) -> dict:
    times, firsts, bests, trials = [], [], [], []
    tests = [run["test"] for run in runs if not math.isnan(run.get("test", math.nan))]
    for run in runs:
        inside = [e for e in run["events"] if e["t"] <= budget]
        reached = [e["t"] for e in inside if e["acc"] >= target]
        times.append(min(reached) if reached else math.inf)
        # when the run's first epoch ended: no time to target can be shorter
        firsts.append(min((e["t"] for e in inside), default=math.inf))
        bests.append(max((e["acc"] for e in inside), default=0.0))
        trials.append(sum(1 for f in run["finished"] if f["t"] <= budget))
    return {"times": times, "firsts": firsts, "bests": bests, "trials": trials, "tests": tests,
            "time": statistics.median(times), "first": statistics.median(firsts),
            "best": statistics.median(bests), "n_trials": statistics.median(trials)}


def _seconds(value: float, budget: float) -> str:
    return f"> {budget:.0f} s" if math.isinf(value) else f"{value:.1f} s"


def _table(summary: dict[str, dict], budget: float, target: float) -> str:
    lines = [f"target validation accuracy {target:.4f}, budget {budget:.0f} s per run",
             "| arm | time to target, median [range] | reached | first score, median | best "
             "at budget, median [range] | trials finished, median [range] | test accuracy "
             "of the best, retrained, median [range] |",
             "|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        reached = sum(1 for t in s["times"] if not math.isinf(t))
        lines.append(
            f"| {arm} | {_seconds(s['time'], budget)} [{_seconds(min(s['times']), budget)} - "
            f"{_seconds(max(s['times']), budget)}] | {reached}/{len(s['times'])} | "
            f"{_seconds(s['first'], budget)} | "
            f"{s['best']:.4f} [{min(s['bests']):.4f} - {max(s['bests']):.4f}] | "
            f"{s['n_trials']:.0f} [{min(s['trials'])} - {max(s['trials'])}] | "
            + (f"{statistics.median(s['tests']):.4f} [{min(s['tests']):.4f} - "
               f"{max(s['tests']):.4f}] |" if s["tests"] else "- |"))
    return "\n".join(lines)


def _ratio(slow: dict, fast: dict, budget: float, wanted: float | None = None) -> str:
    """slow's median time-to-target over fast's; with `wanted` (a target ratio), also by when
    fast had to get there and when its first score came (what bounds it from below)."""
    if math.isinf(fast["time"]):
        return "n/a (ours missed the target in most seeds)"
    if math.isinf(slow["time"]):
        return f"> {budget / fast['time']:.1f}x (it missed the target in most seeds)"
    ratio = f"{slow['time'] / fast['time']:.1f}x"
    if wanted:
        ratio += (f" ({wanted:g}x needs ours by {slow['time'] / wanted:.1f} s; its first "
                  f"validation score came at {_seconds(fast['first'], budget)}, median)")
    return ratio


def _write_out(path: str, args: argparse.Namespace, runs: dict, **more) -> None:
    Path(path).write_text(json.dumps({"args": vars(args), **more, "runs": runs}),
                          encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--data-dir")
    parser.add_argument("--budget", type=float, default=80.0, help="wall seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, help="validation accuracy to reach "
                        "(default: the references' best + 0.25 points)")
    parser.add_argument("--arms", help="default: naive,expert,ours,random for mlp, "
                        "expert,ours,random for cnn")
    parser.add_argument("--no-final-test", action="store_true",
                        help="skip retraining each run's best config for its test accuracy")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                        help="another service run with these search.run flags")
    parser.add_argument("--out", help="also write every run's events to this JSON file")
    parser.add_argument("--run-arm", help=argparse.SUPPRESS)  # internal: one script run
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    if args.run_arm:
        _script_arm(args.run_arm, args.study, args.data, args.data_dir, args.seed,
                    args.budget, args.t0, Path(args.events))
        return 0
    if args.arms is None:
        args.arms = "naive,expert,ours,random" if args.study == "mlp" else "expert,ours,random"

    arms: dict[str, list[str] | None] = {}
    for name in filter(None, args.arms.split(",")):  # --arms "": the variants alone
        arms[name] = {"naive": None, "expert": None, "ours": [],
                      "random": ["--sampler", "random"]}[name]
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        arms[name] = shlex.split(flags)
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SEARCH_CACHE_HOME": str(Path(tmp) / "cache-home")}
        os.environ.update(env)
        from search import data as data_module

        # every run, of every arm, starts with the data cache filled, as any start after a
        # machine's first does (benchmarks/startup.py measures a cold start)
        data_module.load(args.data, data_dir)
        for seed in range(args.seeds):
            for arm, flags in arms.items():
                workdir = Path(tmp) / f"{arm}-{seed}"
                workdir.mkdir()
                if flags is None:
                    events = workdir / "events.json"
                    t0 = time.time()
                    subprocess.run([sys.executable, __file__, "--run-arm", arm, "--study",
                                    args.study, "--data", args.data,
                                    *(["--data-dir", data_dir] if data_dir else []),
                                    "--seed", str(seed), "--budget", str(args.budget), "--t0",
                                    str(t0), "--events", str(events)], check=True, env=env,
                                   timeout=args.budget + GRACE_S + 60)
                    run = json.loads(events.read_text(encoding="utf-8"))
                else:
                    run = _service_arm(flags, args.study, args.data, data_dir, seed,
                                       args.budget, workdir)
                runs[arm].append(run)
                if args.out:  # as it goes: a run is minutes of machine time
                    _write_out(args.out, args, runs)
                print(f"seed {seed} {arm}: {len(run['finished'])} trials, best "
                      f"{max((e['acc'] for e in run['events']), default=0):.4f} "
                      f"({time.perf_counter() - started:.0f} s so far)", flush=True)
        trainer = _Trainer(args.study, args.data, data_dir, Path(tmp) / "augment")
        references = {name: trainer(params, name)[0]
                      for name, params in trainer.spec.references.items()}
        for arm, arm_runs in runs.items():
            for seed, run in enumerate(arm_runs):
                if args.no_final_test or run.get("best_params") is None:
                    continue
                run["test"] = trainer(trainer.flat(run["best_params"]), arm)[1]
                print(f"seed {seed} {arm}: best config retrained, test "
                      f"{run['test']:.4f}", flush=True)
    target = args.target if args.target is not None else (
        max(references.values()) + TARGET_MARGIN)
    summary = {arm: _summarize(rs, args.budget, target) for arm, rs in runs.items()}
    if args.out:
        _write_out(args.out, args, runs, target=target, references=references)
    print(f"\n{args.study} on {args.data}{' from ' + data_dir if data_dir else ''}: "
          f"{args.seeds} seeds; "
          "reference configs (trained once, the service's epochs): " + ", ".join(
              f"{name} {value:.4f}" for name, value in references.items()))
    print(_table(summary, args.budget, target))
    if "ours" in summary:
        for other in ("naive", "random"):
            if other in summary:
                print(f"{other} / ours median time-to-target: "
                      f"{_ratio(summary[other], summary['ours'], args.budget, WANTED.get(other))}")
        if "expert" in summary:
            print(f"expert / ours median time-to-target: "
                  f"{_ratio(summary['expert'], summary['ours'], args.budget, WANTED['expert'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
