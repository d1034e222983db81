"""Several trial workers for one `python -m search.run` (--workers N, or one per GPU).

Each worker is a process of its own on one device: it loads the data once, opens the same
storage and pulls trials from the same study until the run's budget (--n-trials more trials
than the study had when the run started, counting running ones) is used up. The parent
process logs each finished trial, as a single worker does, and runs the final step.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import warnings
from dataclasses import asdict

import optuna
import torch

from search.config import RunConfig
from search.errors import ConfigError
from search.train import resolve_device

log = logging.getLogger(__name__)

# states that use up the budget: a running trial will finish, so it counts already
_BUDGET_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)
_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
             optuna.trial.TrialState.FAIL)
POLL_S = 1.0  # how often the parent looks for finished trials


def plan_devices(cfg: RunConfig) -> list[str]:
    """One device string per worker. --workers unset: one worker per visible GPU (one on a
    CPU-only machine). Raises ConfigError when --device is not a device, or is cuda without
    a GPU (search.train.resolve_device)."""
    resolve_device(cfg.device)
    gpus = torch.cuda.device_count()
    on_gpu = gpus > 0 and cfg.device in ("auto", "cuda")
    count = cfg.workers if cfg.workers is not None else (gpus if on_gpu else 1)
    if on_gpu:
        return [f"cuda:{i % gpus}" for i in range(count)]
    return [cfg.device if cfg.device != "auto" else "cpu"] * count


def budget_used(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=_BUDGET_STATES))


class StopAtBudget:
    """Callback: stop this worker once the study holds `target` finished or running trials."""

    def __init__(self, target: int) -> None:
        self.target = target

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if budget_used(study) >= self.target:
            study.stop()


def _worker(cfg_dict: dict, study_name: str, device: str, index: int, target: int,
            threads: int) -> None:
    """Entry point of one worker process (spawned: nothing is inherited but arguments)."""
    import storage
    from search import data as data_module
    from search import registry
    from search.objective import TRIAL_FAILURES, Objective
    from search.study import make_pruner, resumed_sampler

    logging.basicConfig(level=logging.WARNING, format=f"worker {index}: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(threads)
    cfg = RunConfig(**cfg_dict)
    study = optuna.load_study(study_name=study_name, storage=storage.open(cfg.storage))
    study.sampler = resumed_sampler(cfg, len(study.trials), worker=index + 1)
    study.pruner = make_pruner(cfg.pruner, cfg.epochs)
    dataset = data_module.load(study.user_attrs["data"]["dataset"], cfg.data_dir)
    objective = Objective(registry.get(cfg.study), dataset, cfg, torch.device(device))
    if budget_used(study) < target:
        study.optimize(objective, n_trials=cfg.n_trials, timeout=cfg.timeout,
                       callbacks=[StopAtBudget(target)], catch=TRIAL_FAILURES)


def run_workers(study: optuna.Study, cfg: RunConfig, devices: list[str], reporter) -> None:
    """Run the trials in one process per entry of `devices`; `reporter(study, trial)` sees
    each finished trial. Raises ConfigError when every worker failed."""
    target = budget_used(study) + cfg.n_trials
    devices = devices[:cfg.n_trials]  # no worker without a trial to run
    cpu_workers = sum(1 for d in devices if d == "cpu")
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used after fork
    processes = [
        context.Process(target=_worker, name=f"search-worker-{i}",
                        args=(asdict(cfg), study.study_name, device, i, target, threads))
        for i, device in enumerate(devices)
    ]
    log.info("%d workers on %s, until the study holds %d trials", len(processes),
             ", ".join(devices), target)
    seen = {t.number for t in study.get_trials(deepcopy=False, states=_FINISHED)}
    for process in processes:
        process.start()
    try:
        while True:
            alive = any(p.is_alive() for p in processes)
            for trial in study.get_trials(deepcopy=False, states=_FINISHED):
                if trial.number not in seen:
                    seen.add(trial.number)
                    reporter(study, trial)
            if not alive:
                break
            time.sleep(POLL_S)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    failed = [(p.name, p.exitcode) for p in processes if p.exitcode != 0]
    for name, code in failed:
        log.warning("%s exited with code %s (its message is above)", name, code)
    if failed and len(failed) == len(processes):
        raise ConfigError("every worker failed; see their messages above")
