"""Creating or resuming the Optuna study behind `python -m search.run`.

A new study records what it depends on (data, split, normalization, space version, config,
library versions) in its user attributes and gets the study's reference configs enqueued as
its first trials. Resuming checks that the data and the space are the ones it was made with.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings

import optuna

import storage as storage_module
from search import costs, registry, tpe_speedups
from search import data as data_module
from search.config import (
    PRUNERS,
    SAMPLERS,
    RunConfig,
    trial_seed,
    versions,
)
from search.data import Dataset
from search.errors import ConfigError
from search.registry import StudySpec

log = logging.getLogger(__name__)

INIT_WAIT_S = 10  # how long a machine waits for another that is creating the same study

# TPE's own random start; the enqueued reference configs count towards it.
TPE_STARTUP_TRIALS = 8


def make_sampler(name: str, seed: int, constrained: bool = False) -> optuna.samplers.BaseSampler:
    """Raises ConfigError on an unknown sampler name. `constrained` (deployment limits): on
    an Optuna without Trial.set_constraint, TPE is given search.costs.constraint_values (with
    it, TPE reads the values each trial sets); either way TPE ranks a config over a limit
    below every one within them, and NSGA-II and GP take them the same way. Random and QMC
    draw as before (an infeasible draw is still
    never trained)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name in ("tpe", "tpe-multivariate"):
            tpe_speedups.install()  # each only where it proves equal to Optuna's own
            # constant_liar: parallel workers do not all propose the same point.
            # multivariate + group models the widths jointly, per number of layers; it costs
            # more per trial as the study grows (benchmarks/trial_overhead.py)
            joint = name == "tpe-multivariate"
            return TrialSeeded(optuna.samplers.TPESampler(
                seed=seed, multivariate=joint, group=joint,
                n_startup_trials=TPE_STARTUP_TRIALS, constant_liar=True,
                constraints_func=costs.constraint_values
                if constrained and not costs.PER_TRIAL_CONSTRAINTS else None,
            ), seed)
        # TPE's way of taking deployment limits, for the other model-based samplers
        limits = (costs.constraint_values if constrained and not costs.PER_TRIAL_CONSTRAINTS
                  else None)
        if name == "nsga2":
            return TrialSeeded(optuna.samplers.NSGAIISampler(seed=seed,
                                                             constraints_func=limits), seed)
        if name == "gp":
            # the spaces are conditional: params outside the ones every trial has are drawn
            # by its independent (random) sampler, which it would warn of at every trial
            return TrialSeeded(optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, constraints_func=limits,
                warn_independent_sampling=False), seed)
        if name == "random":
            return TrialSeeded(optuna.samplers.RandomSampler(seed=seed), seed)
        if name == "qmc":  # indexes one scrambled sequence by trial number already
            return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    raise ConfigError(f"unknown sampler {name!r}; choose {', '.join(SAMPLERS)}")


class TrialSeeded(optuna.samplers.BaseSampler):
    """`inner`, its random state set from (study seed, trial number) before every trial, and
    the study's trials read once per trial.

    A sampler seeded once per process draws the same random points in every process that
    starts with the same seed: two machines starting one study at the same instant, or a
    resumed run replaying the last run's draws. Trial numbers are unique within a study, so
    each trial's random draws are its own, and the same on every rerun of the same history.

    TPE with constant_liar (parallel workers) reads every trial of the study again for each
    parameter it suggests, since other workers' trials may start meanwhile: ten reads per mlp
    trial, about 7 ms each on PostgreSQL (benchmarks/trial_overhead.py). The inner sampler
    sees the study through search.tpe_speedups.TrialsOnce instead (where that change
    applies): the trials as they were at the trial's first suggestion, running ones
    included, for all of its parameters.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int) -> None:
        self.inner, self.seed = inner, seed
        self._views: dict[int, tpe_speedups.TrialsOnce] = {}  # by trial, while it suggests
        self._columns: dict[int, tpe_speedups.ParamColumns] = {}  # by study id

    def _view(self, study, trial):
        if len(study.directions) > 1:
            return PrunedWithoutScores(self._once(study, trial))
        return self._once(study, trial)

    def _once(self, study, trial):
        if not tpe_speedups.applied("trials_once"):
            return study
        view = self._views.get(trial.number)
        if view is None:
            columns = self._columns.setdefault(study._study_id, tpe_speedups.ParamColumns())
            view = self._views[trial.number] = tpe_speedups.TrialsOnce(study, columns)
        return view

    def before_trial(self, study, trial) -> None:
        state = trial_seed(self.seed, trial.number)
        for holder in (self.inner, getattr(self.inner, "_random_sampler", None),
                       getattr(self.inner, "_independent_sampler", None)):
            rng = getattr(holder, "_rng", None)
            if rng is not None:
                rng.rng.seed(state)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(self._view(study, trial), trial, param_name,
                                             param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._views.pop(trial.number, None)
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class PrunedWithoutScores:
    """A study of several objectives as its sampler is shown it: the pruned trials without
    their validation scores by epoch, as Optuna itself would hold them (Trial.report refuses
    several objectives). This service stores them, for CostPeerHalving and the dashboard's
    curves, but TPE ranks pruned trials by their last score in the study's one direction,
    which a study of several has not (Study.direction raises); without scores it ranks them
    all alike, below the complete ones, as for any Optuna study of several objectives."""

    def __init__(self, study) -> None:
        self._study = study

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    @staticmethod
    def _bare(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        if trial.state != optuna.trial.TrialState.PRUNED or not trial.intermediate_values:
            return trial
        bare = copy.copy(trial)
        bare.intermediate_values = {}
        return bare

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        return [self._bare(t) for t in self._study._get_trials(
            deepcopy=deepcopy, states=states, use_cache=use_cache)]

    def get_trials(self, deepcopy: bool = True, states=None):
        return [self._bare(t) for t in self._study.get_trials(deepcopy=deepcopy, states=states)]


REDUCTION_FACTOR = 3  # successive halving and Hyperband keep the best third at each rung


def make_pruner(name: str, epochs: int,
                costs_objectives: tuple[str, ...] = ()) -> optuna.pruners.BasePruner:
    """Raises ConfigError on an unknown pruner name. With `costs_objectives` (a Pareto
    search's cost objectives, search.config.COST_OBJECTIVES keys) "sha" is CostPeerHalving."""
    if costs_objectives and name == "sha":
        return CostPeerHalving(costs_objectives)
    if name == "hyperband":
        return AtRungs(optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=REDUCTION_FACTOR))
    if name == "sha":  # asynchronous successive halving (ASHA): one bracket of Hyperband
        return AtRungs(optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=REDUCTION_FACTOR))
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; choose {', '.join(PRUNERS)}")


class AtRungs(optuna.pruners.BasePruner):
    """Successive halving or Hyperband (min_resource 1), asked only at the epochs where it can
    prune: its rungs, 1, 3, 9, 27, ... (every bracket's are powers of the reduction factor).
    At any other epoch the inner pruner answers no after reading the trial's rung marks from
    the storage, one query per epoch; Objective reports every epoch from 1, so no rung is
    skipped.

    Successive halving finds a trial's rung from the marks it wrote on that trial at earlier
    rungs (its system attributes), and Optuna reads the whole trial from the storage to show
    them (six queries). Only the process running a trial writes its marks, so this one keeps
    them as they are written and shows them to the pruner itself."""

    KEPT = 64  # trials whose marks are kept (a process runs one trial at a time)

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner
        self._marks: dict[int, dict] = {}  # trial id -> the rung marks written on it here

    @staticmethod
    def asks_at(step: int) -> bool:
        """Whether `step` is a rung (a trial's reports may wait until one is:
        search.objective.TrialRecorder)."""
        if step < 1:
            return False
        while step % REDUCTION_FACTOR == 0:
            step //= REDUCTION_FACTOR
        return step == 1

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        if step is None or not self.asks_at(step):
            return False
        if type(self.inner) is not optuna.pruners.SuccessiveHalvingPruner:
            return self.inner.prune(study, trial)
        marks = self._marks.pop(trial._trial_id, {})
        self._marks[trial._trial_id] = marks  # the latest last; the oldest go first
        while len(self._marks) > self.KEPT:
            del self._marks[next(iter(self._marks))]
        shown = copy.copy(trial)
        shown.system_attrs = dict(marks)
        return self.inner.prune(_MarksKept(study, marks, trial._trial_id), shown)


class CostPeerHalving(optuna.pruners.BasePruner):
    """Successive halving for a search of accuracy against costs, where Optuna prunes
    nothing (Trial.should_prune refuses a study of several objectives; search.objective asks
    this pruner itself). A trial's costs are known before its first epoch, so at each rung
    (1, 3, 9, ... epochs, as AtRungs) it is compared only with its cost peers: the trials
    that reached the same epoch and cost no more on any cost objective. It stops when its
    accuracy there is below the best third of those peers (itself included), as successive
    halving would among all. A cheaper trial than any other is never stopped: it is on the
    front whatever its accuracy, and a larger one is stopped only by smaller ones that are
    more accurate at the same point of training."""

    def __init__(self, costs_objectives: tuple[str, ...]) -> None:
        self.fields = tuple(costs.OBJECTIVE_FIELDS[name] for name in costs_objectives)

    asks_at = staticmethod(AtRungs.asks_at)

    def cost_of(self, trial: optuna.trial.FrozenTrial) -> tuple[float, ...] | None:
        measured = trial.user_attrs.get("costs") or {}
        values = tuple(measured.get(f) for f in self.fields)
        return None if None in values else values

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        own = self.cost_of(trial)
        if step is None or own is None or not self.asks_at(step):
            return False
        value = trial.intermediate_values[step]
        peers = [value]
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number or step not in other.intermediate_values:
                continue
            cost = self.cost_of(other)
            if cost is not None and all(c <= o for c, o in zip(cost, own, strict=True)):
                peers.append(other.intermediate_values[step])
        kept = len(peers) // REDUCTION_FACTOR
        return kept > 0 and value < sorted(peers, reverse=True)[kept - 1]


class _MarksKept:
    """`study` for a pruner, with a storage that also keeps in `marks` what the pruner
    writes on trial `trial_id`'s system attributes."""

    def __init__(self, study: optuna.Study, marks: dict, trial_id: int) -> None:
        self._study = study
        self._storage = _KeepingMarks(study._storage, marks, trial_id)

    def __getattr__(self, name: str):
        return getattr(self._study, name)


class _KeepingMarks:
    def __init__(self, inner, marks: dict, trial_id: int) -> None:
        self._inner, self._marks, self._trial_id = inner, marks, trial_id

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        self._inner.set_trial_system_attr(trial_id, key, value)
        if trial_id == self._trial_id:
            self._marks[key] = value

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def open_study(cfg: RunConfig, spec: StudySpec, dataset: Dataset,
               storage: optuna.storages.BaseStorage, study_name: str,
               weights=None) -> optuna.Study:
    """Create the study or resume it. Raises ConfigError when an existing study of that name
    was made for other data, another study, another version of the space or (vgg16) other
    backbone weights or input size."""
    sampler = make_sampler(cfg.sampler, cfg.seed, cfg.constrained)
    pruner = make_pruner(cfg.pruner, cfg.epochs, cfg.objectives[1:])
    directions = ["maximize"] + ["minimize"] * (len(cfg.objectives) - 1)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name,
                                    directions=directions, sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:  # resuming, or another machine made it
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        created = False
    made = [d.name.lower() for d in study.directions]
    if made != directions:
        raise ConfigError(f"study {study_name!r} exists with directions {', '.join(made)}; "
                          f"this run needs {', '.join(directions)} (--objectives "
                          f"{','.join(cfg.objectives)}); pick another --study-name")
    metrics = cfg.metric_names()
    if not created and study.metric_names is not None and study.metric_names != metrics:
        # the same directions, other costs: accuracy,params resumed as accuracy,flops
        raise ConfigError(f"study {study_name!r} exists with objectives "
                          f"{', '.join(study.metric_names)}; this run needs "
                          f"{', '.join(metrics)} (--objectives {','.join(cfg.objectives)}); "
                          "pick another --study-name")
    attrs = study.user_attrs
    if not created and "space_version" not in attrs:
        # only the machine that created the study initializes it (and enqueues the reference
        # configs once); one that started at the same instant waits for it to finish
        deadline = time.monotonic() + INIT_WAIT_S
        while "space_version" not in attrs and time.monotonic() < deadline:
            time.sleep(0.2)
            attrs = study.user_attrs
    backbone = _backbone(cfg, weights)
    if "space_version" not in attrs:
        _initialize(study, cfg, spec, dataset, backbone)
        _set_budget(study, cfg)
        return study
    expected = {"study": spec.name, "space_version": spec.space_version}
    for key, value in expected.items():
        if attrs.get(key) != value:
            raise ConfigError(
                f"study {study_name!r} was made with {key} {attrs.get(key)!r}, this run uses "
                f"{value!r}; pass a new --study-name to start a fresh study"
            )
    made = attrs.get("backbone", {})
    if backbone and (made.get("weights", {}).get("sha256"), made.get("input_size")) != (
            weights.sha256, cfg.input_size):
        # the cached features of other weights or another size would not fit its trials
        raise ConfigError(
            f"study {study_name!r} was made with {made.get('weights', {}).get('kind')} weights "
            f"(sha256 {str(made.get('weights', {}).get('sha256'))[:12]}...) at input size "
            f"{made.get('input_size')}; this run has {weights.kind} "
            f"({weights.sha256[:12]}...) at {cfg.input_size}; pass a new --study-name")
    _warn_changed_settings(study, cfg)
    made = attrs.get("data", {})
    for key in ("dataset", "n_train", "n_val", "split_seed"):
        if made.get(key) != dataset.describe()[key]:
            raise ConfigError(
                f"study {study_name!r} was made on {made.get('dataset')} "
                f"({key}={made.get(key)!r}), this run loaded {dataset.name} "
                f"({key}={dataset.describe()[key]!r}); pass --study-name to keep them apart"
            )
    if made.get("digest") not in (None, dataset.digest):  # the same counts, other pixels
        raise ConfigError(
            f"study {study_name!r} was made on other images of {dataset.name} (images added, "
            f"changed or resized since: data digest {made['digest'][:12]}..., now "
            f"{dataset.digest[:12]}...); use a new --study-name for this data")
    _set_budget(study, cfg)
    return study


def _set_budget(study: optuna.Study, cfg: RunConfig) -> None:
    """Record --max-trials in the study (after every check passed: a refused run writes
    nothing), where every machine reads it."""
    made = study.user_attrs.get("max_trials")
    if cfg.max_trials is None or made == cfg.max_trials:
        return
    if made is not None:
        log.warning("study %r: --max-trials %d replaces its budget of %d trials",
                    study.study_name, cfg.max_trials, made)
    study.set_user_attr("max_trials", cfg.max_trials)


def _warn_changed_settings(study: optuna.Study, cfg: RunConfig) -> None:
    """Resuming with other epochs, batch size, sampler, pruner or seed is allowed, never
    silent: one line here, each trial's `settings` attribute, and the report's table."""
    made = study.user_attrs.get("config", {})
    changed = [f"{key} {made[key]} -> {value}" for key, value in cfg.trial_settings().items()
               if key in made and made[key] != value]
    if changed:
        log.warning("study %r was started with other settings (%s); each trial records its "
                    "own, the final retrain uses the best trial's and the report lists them",
                    study.study_name, ", ".join(changed))


def _backbone(cfg: RunConfig, weights) -> dict:
    """What a frozen-backbone study's features depend on besides the data ({} otherwise)."""
    if weights is None:
        return {}
    return {"weights": weights.describe(), "input_size": cfg.input_size}


def _initialize(study: optuna.Study, cfg: RunConfig, spec: StudySpec, dataset: Dataset,
                backbone: dict) -> None:
    study.set_user_attr("study", spec.name)
    if backbone:
        study.set_user_attr("backbone", backbone)
    study.set_user_attr("data", dataset.describe())
    study.set_user_attr("data_notes", list(dataset.notes))
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("versions", versions())
    study.set_user_attr("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with warnings.catch_warnings():  # experimental in Optuna; only a label
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # optuna-dashboard labels its plots with this instead of "Objective 0"
        study.set_metric_names(cfg.metric_names())
    # last: its presence marks the study as initialized
    study.set_user_attr("space_version", spec.space_version)
    if cfg.references == "skip":
        log.info("new study %r: reference configs not searched (--references skip)",
                 study.study_name)
        return
    for name, params in spec.references.items():
        # skip_if_exists: two workers starting a new study at once enqueue each config once
        study.enqueue_trial(spec.to_trial_params(params), user_attrs={"reference": name},
                            skip_if_exists=True)
    log.info("new study %r: enqueued reference configs %s", study.study_name,
             ", ".join(spec.references))


def last_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """A trial's validation accuracy (its first value in a Pareto search), or for a pruned
    one the validation accuracy of its last epoch."""
    if trial.values:
        return trial.values[0]
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def best_value(study: optuna.Study) -> float | None:
    """The best validation accuracy of a completed trial (of a Pareto search too), or None."""
    if len(study.directions) == 1:
        try:
            return study.best_value
        except ValueError:  # no completed trial yet
            return None
    return max((t.values[0] for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))), default=None)


def load_existing(url: str, study_name: str) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """(study, storage) of a study that must exist (search.final, search.replay); creates
    nothing. Raises ConfigError naming the studies there when it does not, and when it was
    searched in another version of its space (its params would not rebuild its models)."""
    storage_module.check(url)
    path = storage_module.sqlite_path(url)
    if path is not None and not path.is_file():
        raise ConfigError(f"no database {path}: run `python -m search.run` first, or pass the "
                          "--storage it used")
    opened = storage_module.open(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened)]
        raise ConfigError(f"no study {study_name!r} in {storage_module.shown(url)}; studies "
                          f"there: {', '.join(names) or 'none'}") from None
    made_version = study.user_attrs.get("space_version")
    spec = registry.get(study.user_attrs.get("study", "mlp"))
    if made_version is not None and made_version != spec.space_version:
        raise ConfigError(f"study {study.study_name!r} was searched in space {made_version}; "
                          f"this version of the service has {spec.space_version} and cannot "
                          "rebuild its trials; use the release that made it, or search anew "
                          "under another --study-name")
    return study, opened


def config_of_study(study: optuna.Study, **overrides) -> RunConfig:
    """The RunConfig the study was started with (its `config` attribute; RunConfig's defaults
    for a study that saved none), with `overrides` (None values are left out)."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    made = {k: v for k, v in study.user_attrs.get("config", {}).items() if k in known}
    if made:  # a study saved before --latency-runtime timed its trials in PyTorch
        made.setdefault("latency_runtime", "pytorch")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "data_dir" not in given and made.get("data_dir"):
        given["data_dir"] = made["data_dir"]
    return RunConfig(**{**made, "study": study.user_attrs.get("study", "mlp"),
                        "study_name": study.study_name, **given})


def load_study_data(study: optuna.Study, cfg: RunConfig,
                      dataset: Dataset | None = None) -> Dataset:
    """The data `study` was searched on (`dataset` when the caller loaded it already).
    Raises ConfigError when what is found now differs from what the study recorded."""
    made = study.user_attrs.get("data", {})
    if dataset is None:
        dataset = load_recorded(made, cfg.data, cfg.data_dir)
    now = dataset.describe()
    for key in ("dataset", "n_train", "n_val", "n_test", "split_seed"):
        if made and made.get(key) != now[key]:
            raise ConfigError(f"study {study.study_name!r} was searched on {made.get('dataset')}"
                              f" with {key}={made.get(key)!r}; the data found now has "
                              f"{now[key]!r}; point --data-dir at the same files")
    if made.get("digest") not in (None, now["digest"]):
        raise ConfigError(f"study {study.study_name!r} was searched on other images of "
                          f"{dataset.name} (data digest {made['digest'][:12]}..., now "
                          f"{now['digest'][:12]}...): its files were changed since")
    return dataset


def load_recorded(made: dict, data: str = "auto", data_dir: str | None = None) -> Dataset:
    """The data a study or model recorded (`made`: Dataset.describe()), loaded again: a
    named set by its name, the user's own images from their path, read the same way."""
    images = made.get("images")
    if not images:
        return data_module.load(made.get("dataset", data), data_dir)
    known = {f.name for f in dataclasses.fields(data_module.ImageOptions)}
    options = data_module.ImageOptions(**{k: v for k, v in images.get("options", {}).items()
                                          if k in known})
    return data_module.load(images["path"], images=options)
