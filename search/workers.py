"""Several trial workers for one `python -m search.run` (--workers N, or one per GPU).

The first worker is the parent process itself (its data is loaded, its imports are done);
each other one is a process on its own device (start_method: single-threaded CPU workers
are forks of the parent; with GPUs or several threads each they come from a fork server
that imported the service while the parent loaded its data; spawned where neither exists),
handed the training and validation splits, that opens the same storage and pulls trials
from the same study until the run's budget (--n-trials more trials than the study had when
the run started, counting running ones; search.budget) is used up. A thread of the parent
logs each finished trial, as a single worker does, and replaces a worker that dies (its
trial failed and retried at once, not after a heartbeat's grace period); the parent runs
the final step.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict

import optuna
import torch

import storage
from search import budget, registry
from search.config import RunConfig
from search.data import without_test
from search.errors import ConfigError
from search.train import cuda_unusable, resolve_device, use_device

log = logging.getLogger(__name__)

_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
             optuna.trial.TrialState.FAIL)
POLL_S = 1.0  # how often the parent looks for finished trials
# a CPU-only machine: one single-threaded worker per core (True), or one process using every
# core (False); benchmarks/search_efficiency.py measured both (benchmarks/RESULTS.md)
CPU_WORKERS_PER_CORE = True
CPU_WORKERS_MAX = 8  # each worker holds its own copy of the data
# What the fork server imports before it forks any worker. torch._dynamo because every
# torch.optim step imports it at its first call: about 2 s on a slow core, which a spawned
# worker paid in its first epoch. The server runs no torch op and never touches a GPU, so a
# worker forked from it may use CUDA and its own threads, as a spawned one may.
FORKSERVER_PRELOAD = ("search.workers", "search.objective", "search.study", "torch._dynamo")


def cpu_workers(cores: int | None = None) -> int:
    """Workers on a CPU-only machine when --workers is unset."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, CPU_WORKERS_MAX)) if CPU_WORKERS_PER_CORE else 1


def cpu_threads(workers: int) -> int:
    """CPU threads of each of `workers` workers: the machine's cores shared out. A GPU
    worker counts too: its data preparation, augmentation pool and host-side work use the
    CPU (eight workers on an 8-GPU machine each taking every core oversubscribed it)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def plan_devices(cfg: RunConfig) -> list[str]:
    """One device string per worker. --workers unset: --workers-per-device (default the
    study's) on every GPU CUDA can run on, round-robin, or on the one GPU --device cuda:N
    names; on a machine without one cpu_workers(), with one line saying why when torch sees
    GPUs it cannot use. Raises ConfigError when --device is not a device, or is cuda without
    a usable GPU (search.train.resolve_device)."""
    resolve_device(cfg.device)
    per_gpu = cfg.workers_per_device or registry.get(cfg.study).workers_per_gpu
    if cfg.device.startswith("cuda:"):  # one GPU, as many trials on it as on any GPU
        return [cfg.device] * (cfg.workers if cfg.workers is not None else per_gpu)
    gpus = usable_gpus() if cfg.device in ("auto", "cuda") else 0  # --device cpu: no word
    on_gpu = gpus > 0
    count = cfg.workers if cfg.workers is not None else (
        gpus * per_gpu if on_gpu else cpu_workers())
    if on_gpu:  # cuda:0, cuda:1, ..., cuda:0, cuda:1, ...
        return [f"cuda:{i % gpus}" for i in range(count)]
    return [cfg.device if cfg.device != "auto" else "cpu"] * count


def usable_gpus() -> int:
    """GPUs CUDA can run on here. torch counts GPUs through NVML even where CUDA cannot run
    (no driver, or one older than the CUDA of this torch build): those are not planned on,
    and one warning says why (their workers would die at their first tensor)."""
    seen = torch.cuda.device_count()
    if seen == 0 or torch.cuda.is_available():
        return seen
    log.warning("%s; training on the CPU", cuda_unusable(seen))
    return 0



def start_method(devices: list[str], storage_url: str = "") -> str:
    """How run_workers starts the workers after the first on `devices`. "fork" (Linux) when
    every worker is a single-threaded CPU worker (the CPU default: one per core): a fork of
    this process has its imports and data already and costs no second import (its first
    epoch ended with the parent's, 1.7 s before a fork server's worker's, in
    benchmarks/startup.py on 2 cores). Forked workers never use CUDA, and run one thread
    each, so they never enter an OpenMP pool the parent may have started (why PyTorch's
    DataLoader sets one thread in its forked workers). Otherwise (GPUs, or workers with
    several threads each, or a grpc:// storage, whose open channel a fork would copy in a
    state gRPC does not support) "forkserver" where the platform has one, else "spawn"
    (Windows)."""
    methods = multiprocessing.get_all_start_methods()
    if (sys.platform.startswith("linux") and "fork" in methods and len(devices) > 1
            and storage.grpc_address(storage_url) is None
            and all(d == "cpu" for d in devices) and cpu_threads(len(devices)) == 1):
        return "fork"
    return _unforked_method()


def _unforked_method() -> str:
    """A start that copies nothing of this process: the fork server, or spawn (Windows)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _context(method: str):
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # used when it starts
    return context


def prestart(devices: list[str], storage_url: str = "") -> None:
    """Start the fork server now when run_workers will use it, so that it imports the
    service on another core while this process loads the data and opens the study: the
    workers started later are forked from it in milliseconds (a spawned worker took seconds
    of imports before its first trial, and its first epoch seconds more). No-op otherwise
    (one worker: this process runs every trial and starts no other), or once started."""
    if len(devices) > 1 and start_method(devices, storage_url) == "forkserver":
        from multiprocessing import forkserver

        _context("forkserver")  # sets what the server imports, before it starts
        forkserver.ensure_running()


def adopt(environ: dict[str, str] | None) -> None:
    """In a worker: take the parent's environment as it was when the worker was started."""
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)


def _worker(cfg_dict: dict, study_name: str, device: str, index: int, target: int,
            threads: int, dataset, environ: dict[str, str] | None = None,
            deadline: float | None = None) -> None:
    """Entry point of one worker process. It uses nothing of the parent's but its arguments
    (a fork has the parent's memory, but opens its own storage and sets its own logging):
    the data is one of them, its training and validation splits only; `environ`, the
    parent's environment when it started this worker, replaces the fork server's, which may
    be older. Exits 2 with one line on a configuration error. Ctrl-C is the parent's to
    handle."""
    adopt(environ)
    import storage
    from search import registry
    from search.objective import Objective
    from search.study import make_pruner, make_sampler

    # Ctrl-C reaches the whole process group; the parent alone handles it (it stops the
    # workers and fails their trials), so no worker prints a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # force: a forked worker has the parent's handlers
    logging.basicConfig(level=logging.WARNING, format=f"worker {index}: %(message)s",
                        force=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: one line, by the parent
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(threads)
    use_device(device)
    try:
        cfg = RunConfig(**cfg_dict)
        study = optuna.load_study(study_name=study_name, storage=storage.open(cfg.storage))
        # seeded per trial number
        study.sampler = make_sampler(cfg.sampler, cfg.seed, cfg.constrained)
        study.pruner = make_pruner(cfg.pruner, cfg.epochs, cfg.objectives[1:])
        _pull_trials(study, Objective(registry.get(cfg.study), dataset, cfg,
                                      torch.device(device), deadline=deadline), cfg, target)
    except ConfigError as exc:
        print(f"worker {index}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _pull_trials(study: optuna.Study, objective, cfg: RunConfig, target: int) -> None:
    """One worker's share: trials of `study` until it holds `target` counted trials, the
    run's --n-trials are used, or its deadline (objective.deadline, the same for every
    worker) comes: no trial starts after it, and a running one stops there (a failed trial
    fails alone)."""
    from search.objective import TRIAL_FAILURES

    left = None if objective.deadline is None else objective.deadline - time.time()
    if budget.budget_used(study) < target and (left is None or left > 0):
        stops = [budget.StopAtBudget(target)]
        if objective.deadline is not None:
            stops.append(_StopAtDeadline(objective.deadline))
        study.optimize(objective, n_trials=cfg.n_trials, timeout=left, callbacks=stops,
                       catch=TRIAL_FAILURES)


class _StopAtDeadline:
    """A study.optimize callback: no trial after `deadline` (time.time()). Optuna's own
    timeout counts from its start, a moment after `left` above was taken, so without it a
    trial stopped at the deadline could be followed by one more, stopped at once."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if time.time() >= self.deadline:
            study.stop()


def fail_and_retry(study: optuna.Study, pid: int, retry: bool = True) -> list[int]:
    """Fail the RUNNING trials of the dead worker process `pid` on this machine and (unless
    `retry` is False) enqueue each again, as heartbeats would, later, across machines; their
    numbers."""
    from search.objective import worker_id

    dead = worker_id(pid)
    with warnings.catch_warnings():  # Optuna 4.9 renamed it; the old name still works
        warnings.simplefilter("ignore")
        again = optuna.storages.RetryFailedTrialCallback(max_retry=storage.MAX_RETRY)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == dead:
            if study._storage.set_trial_state_values(trial._trial_id,
                                                     optuna.trial.TrialState.FAIL):
                if retry:
                    again(study, study._storage.get_trial(trial._trial_id))
                failed.append(trial.number)
    return failed


def run_workers(study: optuna.Study, cfg: RunConfig, devices: list[str], reporter,
                dataset, weights=None, deadline: float | None = None) -> None:
    """Run this run's --n-trials on every entry of `devices`: this process runs trials on the
    first while a spawned process runs each other one (this process has its data loaded and
    its imports done already: its first trial starts seconds before a spawned worker's);
    `reporter(study, trial)` sees each finished trial, from a thread of this process. A worker
    that dies (killed, out of host memory) has its trial failed and retried, and is replaced
    while the budget is not used. Every worker stops at `deadline` (time.time(); --timeout).
    Raises ConfigError when this process's own trials cannot run (the workers'
    configuration is the same)."""
    from search.objective import Objective

    target = budget.budget_used(study) + cfg.n_trials
    threads = cpu_threads(len(devices))  # CPU and GPU workers alike
    method = start_method(devices, cfg.storage)
    context = _context(method)
    # handed to each worker (pickled unless forked; no second load, no scikit-learn import);
    # the test split stays here: the search never sees it
    searched = without_test(dataset)

    def start(slot: int, replacement: bool = False):
        # a replacement is started from the monitor's thread while this one trains: a fork
        # then could copy a lock another thread holds, so it comes from the fork server
        how = _context(_unforked_method()) if replacement and method == "fork" else context
        process = how.Process(target=_worker, name=f"search-worker-{slot}", args=(
            asdict(cfg), study.study_name, devices[slot], slot, target, threads, searched,
            dict(os.environ), deadline))
        process.start()
        return process

    log.info("%d workers on %s, until the study holds %d trials", len(devices),
             ", ".join(devices), target)
    monitor = _Monitor(study, len(devices) - 1, start, target, reporter)
    if method == "fork":  # at once, from this thread, before any other thread of this run
        # imported once, before the forks: every optimizer's first step needs it
        importlib.import_module("torch._dynamo")
        monitor.start_workers()
    # otherwise the monitor's thread starts them: a fork server still importing would hold
    # back this process's own first trial
    monitor.start()
    here = devices[0]
    all_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # this process is one of the workers
    use_device(here)
    try:
        _pull_trials(study, Objective(registry.get(cfg.study), searched, cfg,
                                      torch.device(here), weights, deadline=deadline),
                     cfg, target)
        monitor.join()  # until every worker has finished its trials
    except BaseException:  # Ctrl-C, or this process's own error: the workers stop too
        monitor.stop()
        for pid in (os.getpid(), *monitor.pids):  # failed now, not left RUNNING
            fail_and_retry(study, pid, retry=False)
        raise
    finally:
        torch.set_num_threads(all_threads)
    monitor.report_new()


class _Monitor(threading.Thread):
    """The thread of run_workers that starts the other workers (slots 1..`count`), watches
    them, logs each finished trial (its own and theirs) and replaces a worker that died."""

    def __init__(self, study, count: int, start, target: int, reporter) -> None:
        super().__init__(name="search-workers-monitor", daemon=True)
        self.study, self.count, self.start_worker = study, count, start
        self.processes: list = []
        self.target, self.reporter = target, reporter
        self.pids: list[int] = []
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=_FINISHED)}
        self.replacements = 2 * (count + 1)  # not restarted forever
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # report_new from the thread and from its owner

    def start_workers(self) -> None:
        """Start the workers not started yet (slot i at processes[i - 1]; None: it could not
        start, and the others go on)."""
        while len(self.processes) < self.count and not self.stopping.is_set():
            slot = len(self.processes) + 1
            try:
                process = self.start_worker(slot)
            except Exception as exc:  # noqa: BLE001 - e.g. out of processes: this one goes on
                log.warning("worker %d could not start (%s); the others go on", slot,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                process = None
            self.processes.append(process)
            if process is not None:
                self.pids.append(process.pid)

    def run(self) -> None:
        self.start_workers()
        while any(p is not None for p in self.processes) and not self.stopping.is_set():
            try:
                self._poll()
            except Exception as exc:  # noqa: BLE001 - e.g. the database briefly unreachable:
                # keep watching (the workers go on; they retry the storage themselves)
                log.warning("watching the workers: %s", str(exc).splitlines()[0])
            self.stopping.wait(POLL_S)

    def _poll(self) -> None:
        for index, process in enumerate(self.processes):
            if process is None or process.is_alive():
                continue
            process.join()
            self.processes[index] = None
            if process.exitcode not in (0, 2):  # 2: its configuration, said in one line
                self._replace(index, process)
        self.report_new()

    def _replace(self, index: int, process) -> None:
        retried = fail_and_retry(self.study, process.pid)
        log.warning("%s died (exit code %s)%s", process.name, process.exitcode,
                    f"; trial {', '.join(map(str, retried))} failed and retried"
                    if retried else "")
        if budget.budget_used(self.study) < self.target and self.replacements > 0:
            self.replacements -= 1
            self.processes[index] = self.start_worker(index + 1, replacement=True)
            self.pids.append(self.processes[index].pid)

    def report_new(self) -> None:
        with self.lock:
            for trial in self.study.get_trials(deepcopy=False, states=_FINISHED):
                if trial.number not in self.seen:
                    self.seen.add(trial.number)
                    self.reporter(self.study, trial)

    def stop(self) -> None:
        """Stop watching and end every worker (SIGTERM's default action: gone, nothing
        printed)."""
        self.stopping.set()
        self.join()
        for process in self.processes:
            if process is not None and process.is_alive():
                process.terminate()
                process.join()
