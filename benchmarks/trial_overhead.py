"""python benchmarks/trial_overhead.py [--sizes 10,100,1000] [--samplers tpe,...]
    [--pruner sha] [--postgres URL]

The service's own cost per trial, without training: what every trial pays for the sampler
(each of --samplers over the mlp space), the storage (SQLite with the service's settings,
and PostgreSQL when one answers), the pruner, the study-wide budget checks (search.budget,
which read the study's trials at each trial's start and end) and the per-trial log line.
The objective does what a real trial does to the study, without the training: suggests the
mlp params through the space, writes the user attributes search.objective writes and reports
a validation accuracy after each of 20 epochs, through the same TrialRecorder (the params
with the start attributes in one transaction, the end attributes in another, reports written
where the pruner is asked about them), and a pruned trial stops there, as a real one does.
The optuna-tpe arm writes as a plain Optuna objective does: one transaction per param, per
attribute and per report, the pruner asked at every epoch, and reads the trials through
Optuna's own RDBStorage (its ORM) instead of storage.reads.

For each storage and study size N it runs N trials in a fresh study and prints the mean
seconds per trial over the last tenth (the cost at that size), split into sampler+storage
and the budget/reporting part, and that total as a share of a typical trial: one mlp trial
trained for real (20 epochs on mnist-5k, the defaults) on the threads each of the service's
default CPU workers has (one per core: one thread), and as a share of the same trial on
every core, each timed in the same process after one untimed run (the first trial of a
process also pays one-off imports). Not a test: timings on
a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import optuna
import torch

import storage
from search import budget, registry, tpe_speedups
from search import data as data_module
from search.config import RunConfig
from search.objective import Objective, TrialRecorder
from search.study import TPE_STARTUP_TRIALS, make_pruner, make_sampler
from search.workers import cpu_threads, cpu_workers

EPOCHS = 20
# what search.objective.Objective writes to every trial besides its reports: "worker" alone
# first, then these two groups through its TrialRecorder (one transaction each, the params
# with the first)
STARTED = ("seed", "settings", "device", "threads", "speed", "n_parameters")
ENDED = ("seconds_per_epoch", "epoch_ended", "best_epoch")


def _typical_trial_seconds(threads: int) -> float:
    """One lecture-MLP trial on `threads` CPU threads, timed warm."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_trial()
    finally:
        torch.set_num_threads(saved)


def _time_trial() -> float:
    spec = registry.get("mlp")
    dataset = data_module.load("mnist-5k")
    with tempfile.TemporaryDirectory() as folder:
        cfg = RunConfig(study="mlp", storage=f"sqlite:///{folder}/s.db", cache_dir=folder,
                        epochs=EPOCHS)
        objective = Objective(spec, dataset, cfg, torch.device("cpu"))
        seconds = []
        for _ in range(2):  # the first also pays the process's one-off imports (torch.optim)
            trial = optuna.trial.FixedTrial(spec.to_trial_params(spec.references["lecture"]))
            trial.study = type("S", (), {"user_attrs": {}, "stop": lambda self: None})()
            started = time.perf_counter()
            objective(trial)
            seconds.append(time.perf_counter() - started)
        return seconds[-1]


PLAIN = "optuna-tpe"  # --samplers name: the same TPE and pruner as Optuna ships them


def _run(url: str, n: int, sampler: str, pruner: str) -> tuple[float, float]:
    """(sampler + storage + pruner, budget + reporting) seconds per trial over the last
    tenth of a study of `n` trials."""
    # PLAIN: Optuna's TPE as it ships (none of search.tpe_speedups' changes)
    with tpe_speedups.as_shipped() if sampler == PLAIN else contextlib.nullcontext():
        return _run_study(url, n, sampler, pruner)


def _run_study(url: str, n: int, sampler: str, pruner: str) -> tuple[float, float]:
    spec = registry.get("mlp")
    opened = storage.open(url)
    if sampler == PLAIN:
        # the same engine and heartbeats, Optuna's own reads (storage.reads: its subclass)
        opened.__class__ = optuna.storages.RDBStorage
        # built here, not by make_sampler: no per-trial seeding or view of the study
        chosen = optuna.samplers.TPESampler(seed=0, n_startup_trials=TPE_STARTUP_TRIALS,
                                            constant_liar=True)
        pruned = make_pruner(pruner, EPOCHS)
        pruned = getattr(pruned, "inner", pruned)
    else:
        chosen, pruned = make_sampler(sampler, 0), make_pruner(pruner, EPOCHS)
    study = optuna.create_study(storage=opened, study_name=f"overhead-{uuid.uuid4().hex[:8]}",
                                direction="maximize", sampler=chosen, pruner=pruned)
    study.set_user_attr("max_trials", n)
    service_s: list[float] = []
    stop = budget.StopAtBudget()

    def objective(trial: optuna.Trial) -> float:
        started = time.perf_counter()
        budget.over_budget(trial.study, trial.number)
        service_s.append(time.perf_counter() - started)
        trial.set_user_attr("worker", 0)
        recorder = TrialRecorder(trial) if sampler != PLAIN else None
        if recorder is None:  # as a user's objective does: one write each
            params = spec.suggest(trial)
            for key in STARTED:
                trial.set_user_attr(key, 0)
        else:
            with storage.params_later(trial):  # as Objective: params with the start write
                params = spec.suggest(trial)
                recorder.write(**dict.fromkeys(STARTED, 0))
        # a learning curve towards a score fixed by the params (crc32: the same in every
        # process, so every arm prunes alike)
        final = 0.5 + 0.45 * (zlib.crc32(repr(params).encode()) % 1000) / 1000
        try:
            for epoch in range(1, EPOCHS + 1):
                value = final * (1 - 0.5 ** epoch)
                if recorder is not None:
                    if recorder.report(value, epoch):
                        raise optuna.TrialPruned()
                    continue
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        finally:
            if recorder is None:
                for key in ENDED:
                    trial.set_user_attr(key, 0)
            else:
                recorder.write(**dict.fromkeys(ENDED, 0))
        return final

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        started = time.perf_counter()
        stop(study, trial)
        logging.getLogger("bench").info("trial %d %s best=%s", trial.number,
                                        trial.state.name, study.best_value)
        service_s[-1] += time.perf_counter() - started

    spans = []
    for _ in range(n):
        started = time.perf_counter()
        study.optimize(objective, n_trials=1, callbacks=[after])
        spans.append(time.perf_counter() - started)
    tail = max(1, n // 10)
    total = sum(spans[-tail:]) / tail
    ours = sum(service_s[-tail:]) / tail
    # not left in the server's database: each run of the defaults would add 2,220 trials
    optuna.delete_study(study_name=study.study_name, storage=opened)
    opened.engine.dispose()
    return total - ours, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--samplers", default="tpe", help="comma-separated --sampler names, "
                        f"or {PLAIN}: TPE and the pruner as Optuna ships them")
    parser.add_argument("--pruner", default="sha", help="the service's default")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("bench").setLevel(logging.WARNING)  # formatted, not printed
    sizes = [int(s) for s in args.sizes.split(",")]
    # the service's default on a CPU-only machine: cpu_workers() processes, each with its
    # share of the cores (search.workers.run_workers); each pays its own trials' overhead
    cores = os.cpu_count() or 1
    threads = cpu_threads(cpu_workers())
    typical = _typical_trial_seconds(threads)
    every_core = _typical_trial_seconds(cores) if cores != threads else typical
    print(f"typical trial (lecture mlp, 20 epochs, mnist-5k, CPU): {typical:.2f} s on "
          f"{threads} thread(s), what each of the default {cpu_workers()} workers has; "
          f"{every_core:.2f} s on all {cores} cores")
    backends = {}
    with tempfile.TemporaryDirectory() as folder:
        backends["sqlite"] = lambda: f"sqlite:///{Path(folder) / uuid.uuid4().hex}.db"
        try:
            storage.open(args.postgres).engine.dispose()
            backends["postgresql"] = lambda: args.postgres
        except Exception as exc:  # noqa: BLE001 - no server: measure SQLite only
            print(f"postgresql skipped: {str(exc).splitlines()[0]}")
        print(f"{'storage':10} {'sampler':16} {'trials':>6} {'sampler+storage':>16} "
              f"{'budget+log':>11} {'per trial':>10} {'of a trial':>10} "
              f"{'all cores':>10}", flush=True)
        per_trial = {}
        for name, url in backends.items():
            for sampler in args.samplers.split(","):
                for n in sizes:
                    optuna_s, ours = _run(url(), n, sampler, args.pruner)
                    per = per_trial[name, sampler, n] = optuna_s + ours
                    print(f"{name:10} {sampler:16} {n:6d} {optuna_s * 1000:13.1f} ms "
                          f"{ours * 1000:8.1f} ms {per * 1000:7.1f} ms {per / typical:9.1%} "
                          f"{per / every_core:9.1%}", flush=True)
    for (name, sampler, n), per in per_trial.items():  # the service's changes, side by side
        plain = per_trial.get((name, PLAIN, n))
        if plain is not None and sampler != PLAIN:
            print(f"{name} {n} trials: {PLAIN} / {sampler} = {plain / per:.1f}x")


if __name__ == "__main__":
    main()
