"""python -m search.final --study-name NAME [--storage URL] [--final-seeds 3]

The final step (also run by `python -m search.run` unless --no-final): retrain the best
trial's params and the study's reference configs with several seeds, save the best seed's
model to runs/<study-name>/model.pt + model.json, reload it into a new instance, evaluate
that on the test split (the only place the test split is read), export and check ONNX,
write metrics.json and report.md/.html, and attach them to the study as Optuna artifacts
with a study note for optuna-dashboard. A progress bar counts the steps on a terminal; a
log line marks each either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

import storage
from search import augment as augment_module
from search import costs, export, registry
from search import data as data_module
from search import metrics as metrics_module
from search.cache import SizeBound
from search.cli import Parser, Steps, add_final_options, describe, run_command, setup_logging
from search.config import RunConfig, check_writable, final_training, trial_seed, versions
from search.data import Dataset
from search.errors import ConfigError
from search.features import FeatureCache, backbone_ms_per_image, backbone_speed
from search.models import Normalize, count_parameters
from search.models.vgg16 import ImageNetInput, VGGWeights, resolve_weights
from search.registry import StudySpec
from search.report import content as report_content
from search.report import front as front_report
from search.report import render
from search.report import sections as report_sections
from search.report.dashboard import attach, attach_front
from search.report.figures import write_figures
from search.retrain import ConfigResult, retrain
from search.study import config_of_study, load_existing, load_study_data
from search.train import predict_scores, resolve_device, use_device

log = logging.getLogger(__name__)

# final-retrain seeds are trial_seed(study seed, FINAL_SEED_OFFSET + k): never a trial's seed
FINAL_SEED_OFFSET = 1_000_000

@dataclass
class Outcome:
    study: optuna.Study
    spec: StudySpec
    dataset: Dataset
    directory: Path
    best_trial: optuna.trial.FrozenTrial
    results: dict[str, ConfigResult]
    model_info: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    report_text: str = ""
    onnx: dict = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    importances: dict = field(default_factory=dict)
    command: str = ""
    other_studies: list[dict] = field(default_factory=list)  # same data, in this storage
    augmentation: dict = field(default_factory=dict)  # report_sections.gather_augmentation
    augment_caption: str = ""
    weights: VGGWeights | None = None  # a frozen backbone's (vgg16)
    options: dict = field(default_factory=dict)  # builder options saved in model.json
    backbone_ms: float | None = None  # per image, of the frozen part (vgg16)
    feature_precision: str = ""  # what the cached features were made at (vgg16)
    # the final retrain's trial_epochs, max_epochs and patience (None: no early stopping)
    schedule: dict = field(default_factory=dict)
    saved: str = "best found"  # the label in `results` of the config saved as the model
    config_costs: dict[str, costs.Costs] = field(default_factory=dict)  # by label in results
    # a Pareto search's: every front model's outcome, cheapest first (this one among them)
    front: list[Outcome] = field(default_factory=list)

    def saved_title(self) -> str:
        """What the saved model is, in words: the best trial or a reference net."""
        if self.saved == "best found":
            return f"trial {self.best_trial.number}, retrained"
        return f"the {self.saved}, retrained (higher on validation than the best found)"


def choose_saved(results: dict[str, ConfigResult], eligible: set[str] | None = None) -> str:
    """The config the final step saves: of the `eligible` labels (None: all; the best found
    always is), the one whose best seed scored highest on validation (never test), the best
    found unless a reference net beat it there. With the reference nets left out of the
    search, this keeps the saved model from ever being worse on validation than the nets the
    search set out to beat; a reference over a deployment limit is never eligible."""
    best = "best found"
    for label, result in results.items():
        if eligible is not None and label not in eligible and label != best:
            continue
        if result.runs and (not results[best].runs or result.best_run().val_accuracy
                            > results[best].best_run().val_accuracy):
            best = label
    return best


def _reproduce_command(study: optuna.Study, trial: optuna.trial.FrozenTrial, cfg: RunConfig,
                       schedule: dict, directory: Path) -> str:
    made = study.user_attrs.get("config", {})
    final = ["--final-seeds", str(cfg.final_seeds), "--final-epochs",
             str(schedule["max_epochs"]), "--final-patience", str(schedule["patience"] or 0),
             *(["--front-models", str(cfg.front_models)] if cfg.pareto else []),
             *(["--front-floor", str(cfg.front_floor)]
               if cfg.pareto and cfg.front_floor is not None else [])]
    run = ["python", "-m", "search.run", "--study", study.user_attrs.get("study", cfg.study),
           "--data", study.user_attrs.get("data", {}).get("dataset", cfg.data),
           "--storage", storage.shown(cfg.storage), "--study-name", study.study_name,
           "--seed", str(made.get("seed", cfg.seed)),
           "--epochs", str(made.get("epochs", cfg.epochs)),
           "--sampler", made.get("sampler", cfg.sampler),
           "--pruner", made.get("pruner", cfg.pruner),
           *(["--objectives", ",".join(cfg.objectives)] if cfg.pareto else []),
           *[part for name, limit in cfg.limits().items() if limit is not None
             for part in (costs.limit_flag(name), str(limit))],
           *(["--latency-runtime", cfg.latency_runtime] if cfg.timed else []),
           "--n-trials", str(len(study.trials)), *final]
    redo = ["python", "-m", "search.final", "--storage", storage.shown(cfg.storage),
            "--study-name", study.study_name, *final]
    replay = ["python", "-m", "search.replay", "--storage", storage.shown(cfg.storage),
              "--study-name", study.study_name, "--trial", str(trial.number)]
    devices = {t.user_attrs.get("device", "?") for t in study.trials} - {"?"}
    gpu = any(d.startswith("cuda") for d in devices)
    return "\n".join([
        "# the whole search: the same trials only for a study run once, by one worker",
        "# (TPE's proposals depend on which trials had finished; resumed or parallel runs",
        "# do not repeat them):",
        shlex.join(run),
        "# this trial again, from its stored params, seed, settings and CPU thread count;",
        "# equal to its stored value on the CPU"
        + ("; this study ran on a GPU, whose kernels differ run to run" if gpu else "")
        + ":",
        shlex.join(replay),
        "# only this final step, from the stored study:",
        shlex.join(redo),
        "# evaluate the saved model again:",
        shlex.join(["python", "-m", "search.evaluate", str(directory / "model.pt")]),
    ])


def front_trials(study: optuna.Study, k: int,
                 floor: float = 0.0) -> list[optuna.trial.FrozenTrial]:
    """Up to `k` Pareto-optimal completed trials of a study of accuracy against costs whose
    validation accuracy is above `floor`, spread along its front, ordered from the cheapest
    to the most accurate: the most accurate always, the cheapest (on its costs in order)
    when k > 1, between them those whose first cost lies nearest to evenly spaced points on
    a log scale. Empty when no trial of the front is above the floor."""
    def cheapest_first(t: optuna.trial.FrozenTrial) -> tuple:
        return tuple(t.values[1:]), -t.values[0]

    def log_cost(t: optuna.trial.FrozenTrial) -> float:
        return math.log(max(t.values[1], 1e-9))  # a latency can be well under 1 ms

    front = sorted((t for t in study.best_trials if t.values[0] > floor), key=cheapest_first)
    if len(front) <= k:
        return front
    top = max(front, key=lambda t: (t.values[0], [-v for v in t.values[1:]]))
    if k == 1:
        return [top]
    cheapest = front[0]  # not the top: a front of two or more trades accuracy for cost
    chosen = {cheapest.number: cheapest, top.number: top}
    low, high = log_cost(cheapest), log_cost(top)
    for j in range(1, k - 1):
        aim = low + (high - low) * j / (k - 1)
        pick = min((t for t in front if t.number not in chosen),
                   key=lambda t: abs(log_cost(t) - aim))
        chosen[pick.number] = pick
    return sorted(chosen.values(), key=cheapest_first)


def _front_above_floor(study: optuna.Study, cfg: RunConfig,
                       n_classes: int) -> list[optuna.trial.FrozenTrial]:
    """front_trials above cfg.front_floor (None: chance): a net cheaper than every other is
    on the front whatever it scores, and one no better than guessing is no model to ship."""
    floor = 1 / n_classes if cfg.front_floor is None else cfg.front_floor
    chosen = front_trials(study, cfg.front_models, floor)
    below = sum(1 for t in study.best_trials if t.values[0] <= floor)
    said = (f"--front-floor {floor:g}" if cfg.front_floor is not None
            else f"chance ({floor:.4g}, {n_classes} classes)")
    if not chosen:
        best = max(t.values[0] for t in study.best_trials)
        raise ConfigError(f"no trial of the Pareto front scores above {said} (the best: "
                          f"{best:.4f} validation accuracy); lower --front-floor or run more "
                          "trials")
    if below:
        log.info("final: %d trial(s) of the front at or below %s validation accuracy left "
                 "out", below, said)
    return chosen


def front_folder(trial: optuna.trial.FrozenTrial) -> str:
    """The subfolder of runs/<study-name>/ that holds a front model of a Pareto search."""
    return f"trial-{trial.number}"


@dataclass
class _Schedule:
    """How a trial's config is retrained: the trial's own epochs and batch size."""
    trial_epochs: int
    max_epochs: int
    patience: int | None
    batch_size: int

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial, cfg: RunConfig) -> _Schedule:
        # a trial's own settings (older studies stored epochs and batch_size as attrs of
        # their own)
        ran_with = {**trial.user_attrs, **trial.user_attrs.get("settings", {})}
        trial_epochs = int(ran_with.get("epochs", cfg.epochs))
        epochs, patience = final_training(cfg, trial_epochs)
        return cls(trial_epochs, epochs, patience, int(ran_with.get("batch_size",
                                                                     cfg.batch_size)))

    def as_dict(self) -> dict:
        return {"trial_epochs": self.trial_epochs, "max_epochs": self.max_epochs,
                "patience": self.patience}


def run_final(study: optuna.Study, cfg: RunConfig,
              opened: optuna.storages.BaseStorage | None = None,
              dataset: Dataset | None = None) -> Outcome:
    """Retrain, save, reload, evaluate, export and report; `dataset` is the one the search
    loaded (checked against the study), else loaded again. A study of accuracy against
    costs (--objectives) retrains up to cfg.front_models trials of its Pareto front, each
    saved in its own subfolder, and writes a report of the front above them; the outcome
    returned is then the most accurate one's, with every front model's in `front`. Raises
    ConfigError when the study has no completed trial, its data cannot be found or differs,
    or every retrain seed diverged."""
    spec = registry.get(study.user_attrs.get("study", cfg.study))
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise ConfigError(f"study {study.study_name!r} has no completed trial to retrain; "
                          "run more trials first")
    pareto = len(study.directions) > 1
    dataset = load_study_data(study, cfg, dataset)
    chosen = (_front_above_floor(study, cfg, len(dataset.classes)) if pareto
              else [study.best_trial])
    lead = chosen[-1]  # the most accurate: the reference nets retrain with its settings
    device = resolve_device(cfg.device)
    use_device(device)
    params = {t.number: spec.suggest(optuna.trial.FixedTrial(t.params)) for t in chosen}
    schedules = {t.number: _Schedule.of(t, cfg) for t in chosen}
    seeds = [trial_seed(cfg.seed, FINAL_SEED_OFFSET + k) for k in range(cfg.final_seeds)]
    schedule = schedules[lead.number]
    what = (f"{len(chosen)} trials of the Pareto front ("
            + ", ".join(str(t.number) for t in chosen) + ")" if pareto
            else f"trial {lead.number}'s params")
    log.info("final: retraining %s and %d reference configs with seeds %s, up to %d epochs "
             "each (trials ran %d)%s", what,
             len(spec.references), seeds, schedule.max_epochs, schedule.trial_epochs,
             f", stopped after {schedule.patience} without a better validation accuracy"
             if schedule.patience else "")

    cache = storage.cache_dir(cfg.storage, cfg.cache_dir)
    bound = SizeBound.gigabytes(cache, cfg.cache_max_gb)
    augment = augment_module.AugmentCache.for_dataset(dataset, cache / "augment", bound,
                                                      cfg.augment_flips)
    weights = _study_weights(study, cfg) if spec.feature_head else None
    features = None if weights is None else FeatureCache(
        {"train": dataset.train.x, "val": dataset.val.x, "test": dataset.test.x},
        dataset.name, weights, cache / "features", device, bound=bound)

    found = list(params.values())
    references = {f"{name} net": reference for name, reference in spec.references.items()
                  if reference not in found}
    # each model's first three WRITE_STEPS, then the front's report, then the upload
    steps = Steps(len(seeds) * (len(chosen) + len(references))
                  + (len(WRITE_STEPS) - 1) * len(chosen) + pareto + 1, "final step")
    try:
        def train(config_params, label, how: _Schedule):
            return retrain(spec, config_params, label, dataset, seeds=seeds,
                           epochs=how.max_epochs, patience=how.patience,
                           batch_size=how.batch_size, device=device, augment=augment,
                           features=features, input_size=cfg.input_size, progress=steps)

        retrained = {t.number: train(params[t.number], "best found", schedules[t.number])
                     for t in chosen}
        trained_refs = {label: train(reference, label, schedule)
                        for label, reference in references.items()}
        options = registry.saved_options(spec, cfg.input_size)

        def measure(result: ConfigResult) -> costs.Costs:
            # a latency is timed again here, every model on one device one after another, so
            # the front and the reference nets compare like for like (the trials' figures
            # were taken beside other workers)
            return costs.measure(spec, result.params, dataset.image_shape,
                                 len(dataset.classes), timed_on=device if cfg.timed else None,
                                 runtime=cfg.latency_runtime,
                                 **options)

        ref_costs = {label: measure(result) for label, result in trained_refs.items()}
        directory = Path(cfg.runs_dir) / study.study_name
        # everything is written to a fresh folder beside it, then moved into place at once
        Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{study.study_name}.partial-",
                                        dir=cfg.runs_dir))
        outcomes = []
        try:
            for trial in chosen:
                found_result = retrained[trial.number]
                if not found_result.runs:
                    message = (f"every final retrain seed of trial {trial.number} diverged: "
                               f"{'; '.join(found_result.failures)}")
                    if not pareto:
                        raise ConfigError(message)
                    log.warning("%s; left out of the saved front", message)
                    continue
                # a reference net the trial drew exactly is the trial's own retrain
                results = {"best found": found_result}
                for name, reference in spec.references.items():
                    label = f"{name} net"
                    results[label] = (trained_refs[label] if label in trained_refs else
                                      dataclasses.replace(
                                          retrained[next(t.number for t in chosen
                                                         if params[t.number] == reference)],
                                          label=label))
                config_costs = {"best found": measure(found_result), **ref_costs}
                for label in results.keys() - config_costs.keys():
                    config_costs[label] = measure(results[label])
                folder = staging / front_folder(trial) if pareto else staging
                folder.mkdir(exist_ok=True)
                # a front model is saved as it is: it is on the front for its costs
                eligible = {"best found"} if pareto else {
                    label for label, cost in config_costs.items()
                    if cost.over(cfg.limits()) is None}
                outcome = Outcome(study, spec, dataset, folder, trial, results,
                                  weights=weights, options=options, config_costs=config_costs,
                                  saved=choose_saved(results, eligible))
                if outcome.saved != "best found":
                    log.info("the %s scored higher on validation than the best found (%.4f "
                             "against %.4f at their best seeds): it is the saved model",
                             outcome.saved, results[outcome.saved].best_run().val_accuracy,
                             found_result.best_run().val_accuracy)
                how = schedules[trial.number]
                _write_run(outcome, cfg, results[outcome.saved].params, how.as_dict(),
                           how.batch_size, device, opened, steps,
                           directory / folder.relative_to(staging))
                outcomes.append(outcome)
            if not outcomes:
                raise ConfigError("every final retrain seed of every front trial diverged")
            if pareto:
                front_report.write(outcomes, staging, cfg.objectives[1:])
                steps(FRONT_STEP)
            _publish(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the move; left by a failure
        for outcome in outcomes:
            outcome.directory = directory / outcome.directory.relative_to(staging)
        outcome = outcomes[-1]
        if pareto:
            outcome.front = outcomes
            attach_front(outcomes, directory, opened or study._storage, cfg)
        else:
            attach(outcome, opened or study._storage, cfg)
        steps(WRITE_STEPS[3])
    finally:
        steps.close()
    for each in outcomes:
        log.info("final model%s: %s", f" (trial {each.best_trial.number})" if pareto else "",
                 metrics_module.accuracy_line(each.test))
        log.info("saved: %s (+ model.json, model.onnx, metrics.json, report.md)",
                 each.directory / "model.pt")
    log.info("report: %s", directory / "report.html")
    return outcome


# what the final step does after the retrains, each one step of its progress
WRITE_STEPS = ("model saved, reloaded into a new instance and scored on the test split",
               "ONNX exported, checked against the reloaded model and timed",
               "report written", "files attached to the study for optuna-dashboard")
FRONT_STEP = "report of the Pareto front written"


def _write_run(outcome: Outcome, cfg: RunConfig, params, schedule: dict, batch_size: int,
               device: torch.device, opened, steps: Steps, final_dir: Path) -> None:
    """The run folder's files, in outcome.directory (moved to `final_dir` once all are
    written); `schedule`: the final retrain's trial_epochs, max_epochs and patience."""
    study, dataset, weights = outcome.study, outcome.dataset, outcome.weights
    outcome.schedule = schedule
    _save_and_reload(outcome, params, schedule, batch_size, steps)
    if weights is not None:
        outcome.backbone_ms = backbone_ms_per_image(weights, cfg.input_size, dataset.test.x,
                                                    device)
        made_at = backbone_speed(device).autocast
        outcome.feature_precision = str(made_at or torch.float32).removeprefix("torch.")
    outcome.other_studies = report_sections.gather_other_studies(study, opened or study._storage)
    if outcome.spec.augments:
        outcome.augmentation = report_sections.gather_augmentation(study)
    write_figures(outcome)
    outcome.command = _reproduce_command(study, outcome.best_trial, cfg, schedule, final_dir)
    render.write(report_content.build(outcome), outcome.directory, f"Study {study.study_name}")
    steps(WRITE_STEPS[2])


KEEP_PREVIOUS = 1  # final runs of a study kept beside the newest (a vgg16 one: ~0.3-1 GB)


def _publish(staging: Path, directory: Path) -> None:
    """Move the finished folder `staging` to `directory`. The previous final run there is
    not destroyed: it is renamed to <name>.previous-<time it was made>, and the log says
    so; of the runs kept that way, the KEEP_PREVIOUS newest stay, older ones are removed."""
    if directory.exists():
        made = time.strftime("%Y%m%d-%H%M%S", time.localtime(directory.stat().st_mtime))
        kept = directory.with_name(f"{directory.name}.previous-{made}")
        suffix = 1
        while kept.exists():
            kept = directory.with_name(f"{directory.name}.previous-{made}-{suffix}")
            suffix += 1
        directory.rename(kept)
        log.info("the previous final run of this study is kept in %s", kept)
        older = sorted(directory.parent.glob(f"{directory.name}.previous-*"),
                       key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_PREVIOUS:]
        for folder in older:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed an older final run of this study: %s", folder)
    staging.rename(directory)


def _study_weights(study: optuna.Study, cfg: RunConfig) -> VGGWeights:
    """The backbone weights the study's trials used; ConfigError when they are gone or
    changed (features of other weights would not fit the trained heads)."""
    weights = resolve_weights(cfg.weights, cfg.seed)
    made = study.user_attrs.get("backbone", {}).get("weights", {})
    if made and made.get("sha256") != weights.sha256:
        raise ConfigError(f"study {study.study_name!r} was searched with weights "
                          f"{made.get('source')} (sha256 {str(made.get('sha256'))[:12]}...); "
                          f"{weights.source} differs ({weights.sha256[:12]}...)")
    return weights


def _applied_normalization(model: torch.nn.Module) -> dict:
    """The mean and std the model's own input layer applies (Normalize, or VGG16's
    ImageNetInput), read from its buffers."""
    layer = next(m for m in model.modules() if isinstance(m, Normalize | ImageNetInput))
    return {"mean": layer.mean.flatten().tolist(), "std": layer.std.flatten().tolist()}


def _save_and_reload(outcome: Outcome, params, schedule: dict, batch_size: int,
                     steps: Steps) -> None:
    spec, dataset = outcome.spec, outcome.dataset
    saved = outcome.results[outcome.saved]
    run = saved.best_run()
    from_trial = outcome.saved == "best found"
    backbone = {} if outcome.weights is None else {"weights_state": outcome.weights.state}
    built = spec.build(params, dataset.image_shape, len(dataset.classes),
                       dataset.channel_mean, dataset.channel_std, **outcome.options, **backbone)
    model = built.model
    # a frozen-backbone study trained only the head: the rest is the weights' own
    (model.head if outcome.weights is not None else model).load_state_dict(run.state)
    model.eval()
    info = {
        "study": spec.name, "study_name": outcome.study.study_name,
        "space_version": spec.space_version,
        # the config saved: the best trial's, or a reference net that beat it on validation
        "config": outcome.saved,
        "trial_number": outcome.best_trial.number if from_trial else None,
        "params": outcome.best_trial.params if from_trial else spec.to_trial_params(params),
        "params_resolved": dataclasses.asdict(params),
        "input": {"shape": list(dataset.image_shape), "dtype": "float32",
                  "scale": "uint8 pixels / 255", "mean": list(dataset.channel_mean),
                  "std": list(dataset.channel_std), "normalized_inside_model": True,
                  "applied": _applied_normalization(model)},
        "classes": list(dataset.classes), "data": dataset.describe(),
        # epochs: what the saved seed trained (of at most max_epochs, early stopping after
        # `patience`); trial_epochs: what the search's trials ran
        "training": {"epochs": run.epochs_trained, "best_epoch": run.best_epoch,
                     **schedule, "seed": run.seed,
                     "seeds": [r.seed for r in saved.runs],
                     "batch_size": batch_size},
        "n_parameters": saved.n_parameters,
        "n_parameters_total": count_parameters(model, trainable_only=False),
        "costs": outcome.config_costs[outcome.saved].as_attrs(),
        "options": outcome.options,
        **({"weights": outcome.weights.describe()} if outcome.weights else {}),
        "versions": versions(),
    }
    weights, meta = export.save_model(model, outcome.directory, info)
    loaded = export.load_model(weights)  # a new instance, from the two files only
    in_memory = predict_scores(model, dataset.test.x)
    reloaded = predict_scores(loaded.model, dataset.test.x)
    if not torch.equal(in_memory.argmax(1), reloaded.argmax(1)) or not torch.allclose(
            in_memory, reloaded, atol=1e-6):
        raise RuntimeError(f"{weights}: the reloaded model predicts differently from the "
                           "trained one; this is a bug, please report it")
    y_true, y_pred = dataset.test.y.numpy(), reloaded.argmax(1).numpy()
    outcome.test = metrics_module.compute(y_true, y_pred, dataset.classes)
    outcome.report_text = metrics_module.report_text(y_true, y_pred, dataset.classes)
    steps(WRITE_STEPS[0])
    outcome.model_info = {**loaded.info, "metrics": {
        "val_accuracy": run.val_accuracy, "test_accuracy": outcome.test["accuracy"],
        "macro_f1": outcome.test["macro_f1"], "n_test": outcome.test["n_test"]}}
    # model.pt unchanged: its digest in model.json still holds
    meta.write_text(json.dumps(outcome.model_info, indent=2) + "\n", encoding="utf-8")
    onnx_path = outcome.directory / "model.onnx"
    exporter = export.export_onnx(loaded.model, onnx_path, dataset.test.x[:2].float() / 255)
    outcome.onnx = {**export.check_onnx(onnx_path, loaded.model, dataset.test.x),
                    "exporter": exporter,
                    "latency": costs.onnx_latency(onnx_path, dataset.image_shape)}
    steps(WRITE_STEPS[1])
    summary = {label: r.summary() for label, r in outcome.results.items()}
    (outcome.directory / "metrics.json").write_text(json.dumps(
        {**outcome.test, "model": "model.pt (reloaded)", "onnx_check": outcome.onnx,
         "costs": outcome.model_info["costs"], "comparison": summary}, indent=2) + "\n",
        encoding="utf-8")


def build_parser() -> Parser:
    parser = Parser(prog="python -m search.final", description=describe(__doc__))
    parser.add_argument("--study-name", required=True, metavar="NAME",
                        help="the study to finish, as search.run named it; required")
    parser.add_argument("--storage", default=storage.DEFAULT_URL, metavar="URL",
                        help="where the study is kept (as search.run's --storage)")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the study's IDX files, "
                        "if they moved since the search (default: where the study found "
                        "them, else $SEARCH_DATA_DIR or ./data)")
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto (the first GPU CUDA can run on, else the CPU), cpu, cuda "
                        "or cuda:N")
    add_final_options(parser)
    parser.add_argument("--artifact-dir", metavar="DIR", help="Optuna artifact store "
                        "(default: beside the SQLite file, e.g. studies-artifacts/, else "
                        "./artifacts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        resolve_device(args.device)  # flags first: nothing is read for a refused command
        data_module.check_data_dir(args.data_dir)
        for flag, directory in (("--runs-dir", args.runs_dir),
                                ("--artifact-dir", args.artifact_dir)):
            if directory is not None:
                check_writable(directory, flag)
        study, opened = load_existing(args.storage, args.study_name)
        cfg = config_of_study(study, storage=args.storage, device=args.device,
                              data_dir=args.data_dir, final_seeds=args.final_seeds,
                              front_models=args.front_models,
                              front_floor=args.front_floor,
                              final_epochs=args.final_epochs,
                              final_patience=args.final_patience, runs_dir=args.runs_dir,
                              artifact_dir=args.artifact_dir)
        run_final(study, cfg, opened)

    return run_command(body, "the previous final run's files are as they were; run the "
                             "same command again")


if __name__ == "__main__":
    sys.exit(main())
