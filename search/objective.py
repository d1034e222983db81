"""The objective every trial of `python -m search.run` calls: a class holding loaded data.

Data is loaded and moved to the device once, in __init__; a trial only samples params,
builds the model through the study's builder, trains, and returns the best validation
accuracy over its epochs. The test split is not given to this class at all.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time

import optuna
import torch

import storage
from search import budget, costs, registry
from search.augment import AugmentCache
from search.cache import SizeBound
from search.config import RunConfig, trial_seed
from search.data import Dataset
from search.errors import DeadlineReached, TrialDiverged
from search.features import FeatureCache, feature_split
from search.models import count_parameters
from search.models.vgg16 import HEADS, VGGWeights, resolve_weights
from search.registry import StudySpec
from search.train import DeviceSplit, EpochResult, Speed, train_built

log = logging.getLogger(__name__)


class TrialOutOfMemory(Exception):
    """The trial's model or batch did not fit; the trial fails and the study goes on."""


def worker_id(pid: int | None = None) -> str:
    """host:pid of the process running a trial (its `worker` user attribute)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


# exceptions that fail one trial while the study goes on (study.optimize(catch=...))
TRIAL_FAILURES = (TrialOutOfMemory,)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or (
        "can't allocate memory" in text
    )


def free_memory(device: torch.device) -> None:
    """Give back what collected objects held: Python's cycles, then the CUDA caching
    allocator's free blocks (to other processes sharing the GPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


REPORT_EVERY_S = 1.0  # a trial's reports reach the storage at least this often


class TrialRecorder:
    """What a trial writes to its study, in few transactions (storage.write_trial): its
    user attributes in groups (the first with the params suggested within
    storage.params_later), and its per-epoch reports gathered until the pruner is asked
    about one of them, REPORT_EVERY_S has passed since the last write (the dashboard's live
    curves lag by at most that), or the trial ends (the next `write`)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pending: dict[int, float] = {}
        self.written = time.monotonic()
        pruner = getattr(trial.study, "pruner", None)
        # a pruner that answers at some steps only (search.study.AtRungs) is asked there;
        # one that never prunes, never
        self.asks_at = (lambda step: False) if isinstance(pruner, optuna.pruners.NopPruner) \
            else getattr(pruner, "asks_at", lambda step: True)

    def write(self, **user_attrs) -> None:
        """These user attributes and every report not written yet, in one transaction."""
        storage.write_trial(self.trial, user_attrs, self.pending)
        self.pending = {}
        self.written = time.monotonic()

    def report(self, value: float, step: int, prunable: bool = True) -> bool:
        """Record the value of `step`; whether the trial should be pruned there (written
        first, so the pruner sees it)."""
        self.pending[step] = value
        ask = prunable and self.asks_at(step)
        if ask or time.monotonic() - self.written >= REPORT_EVERY_S:
            self.write()
        if not ask:
            return False
        study = self.trial.study
        if len(study.directions) == 1:
            return self.trial.should_prune()
        # Optuna's should_prune refuses several objectives; the study's pruner
        # (search.study.CostPeerHalving) is asked with the trial as stored
        return study.pruner.prune(study, self.trial.storage.get_trial(self.trial._trial_id))


class Objective:
    def __init__(self, spec: StudySpec, dataset: Dataset, cfg: RunConfig,
                 device: torch.device, weights: VGGWeights | None = None,
                 speed: Speed | None = None, deadline: float | None = None) -> None:
        """`speed`: train every trial with these settings (a replay, those its trial had);
        None: Speed.of each trial's model on `device`. `deadline` (time.time()): the end
        of the search (--timeout); a trial still training then stops, pruned at its last
        score."""
        self.spec = spec
        self.cfg = cfg
        self.device = device
        self.speed = speed
        self.deadline = deadline
        self.image_shape = dataset.image_shape
        self.n_classes = len(dataset.classes)
        self.mean, self.std = dataset.channel_mean, dataset.channel_std
        self.train = DeviceSplit.of(dataset.train, device)
        self.val = DeviceSplit.of(dataset.val, device)
        # augmented copies of the training split, shared by every trial (search.augment)
        cache = storage.cache_dir(cfg.storage, cfg.cache_dir)
        bound = SizeBound.gigabytes(cache, cfg.cache_max_gb)
        self.augment = AugmentCache.for_dataset(dataset, cache / "augment", bound,
                                                cfg.augment_flips)
        # a frozen backbone's outputs, computed once (search.features); never the test split
        self.features = None
        if spec.feature_head is not None:
            self.features = FeatureCache(
                {"train": dataset.train.x, "val": dataset.val.x}, dataset.name,
                weights or resolve_weights(cfg.weights, cfg.seed), cache / "features", device,
                bound=bound)
            # before any trial: trials never run the backbone. One pass makes every head's
            # cut and stores them all; only the first head's are held in memory
            for split in ("train", "val"):
                self.features.get(split, HEADS[0], cfg.input_size)

    def _inputs(self, params):
        """(train, val, build) for a trial: images, or the cached features of its head."""
        if self.features is None:
            return self.train, self.val, lambda: self.spec.build(
                params, self.image_shape, self.n_classes, self.mean, self.std)
        head = self.spec.feature_head(params)
        train, val = (feature_split(self.features, name, head, self.cfg.input_size, split.y,
                                    self.device)
                      for name, split in (("train", self.train), ("val", self.val)))
        return train, val, lambda: self.spec.build_head(params, train.x.shape[1],
                                                        self.n_classes)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        # which process runs it: a parent whose worker died fails and retries its trial
        trial.set_user_attr("worker", worker_id())
        if budget.over_budget(trial.study, trial.number):
            trial.set_user_attr(budget.OVER_BUDGET, True)
            trial.study.stop()
            raise optuna.TrialPruned("the study's --max-trials is used up")
        try:
            return self._train(trial)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not _is_out_of_memory(exc):
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # the exception and its frames (model, optimizer state, activations) are gone here:
        # only now can their memory be given back, for the next trial on a shared GPU
        free_memory(self.device)
        trial.set_user_attr("failure", f"out of memory: {message}")
        raise TrialOutOfMemory(message)

    def _check_limits(self, trial: optuna.Trial, cost: costs.Costs) -> dict:
        """The trial's costs as user attributes (and, under deployment limits, its constraint
        values for the sampler). A config over a limit is pruned here, before it is built,
        with those attributes written (with its params) in one transaction."""
        limits = self.cfg.limits()
        attrs: dict = {"costs": cost.as_attrs()}
        if self.cfg.constrained:
            attrs[costs.CONSTRAINTS_ATTR] = cost.tell(trial, limits)
        over = cost.over(limits)
        if over is not None:
            attrs["infeasible"] = over
            storage.write_trial(trial, attrs)
            raise optuna.TrialPruned(f"infeasible: {over}")
        return attrs

    def _train(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """The trial from its params to its best validation accuracy (and, in a Pareto
        search, its cost objectives, counted before it trained); an out-of-memory
        error anywhere in it (moving the model or features to the device, building, training)
        is the caller's to handle."""
        # the params reach the database with the start attributes, in one commit instead of
        # one each (storage.params_later)
        with storage.params_later(trial):
            params = self.spec.suggest(trial)
            seed = trial_seed(self.cfg.seed, trial.number)
            computed = len(self.features.computed) if self.features is not None else 0
            try:
                # what the saved model would cost, before anything is trained or allocated
                # (and, where asked, the model built for real and timed: search.costs)
                cost = costs.measure(self.spec, params, self.image_shape, self.n_classes,
                                     timed_on=self.device if self.cfg.timed else None,
                                     runtime=self.cfg.latency_runtime,
                                     **registry.saved_options(self.spec, self.cfg.input_size))
                cost_attrs = self._check_limits(trial, cost)
                torch.manual_seed(seed)  # weight init and dropout masks
                train, val, build = self._inputs(params)
                built = build()
            except ValueError as exc:  # params the builder refuses for this input shape
                trial.set_user_attr("failure", f"does not fit the input: {exc}")
                raise optuna.TrialPruned(str(exc)) from None
            model = built.model.to(self.device)
            reference = trial.user_attrs.get("reference")
            speed = self.speed or Speed.of(model, self.device)
            recorder = TrialRecorder(trial)
            recorder.write(
                seed=seed, settings=self.cfg.trial_settings(), device=str(self.device),
                # CPU threads: another count sums in another order, so a replay uses the same
                threads=torch.get_num_threads(), speed=speed.describe(),
                n_parameters=count_parameters(model), **cost_attrs,
                # did this trial have to run the backbone?
                **({} if self.features is None
                   else {"backbone_runs": len(self.features.computed) - computed}))
        epoch_images = self.augment.epoch_images(built.augment, seed, self.cfg.epochs,
                                                 self.device)
        augment_seconds = self.augment.stats.seconds
        best = {"accuracy": 0.0, "epoch": 0}
        seconds: list[float] = []
        ended: list[float] = []  # wall-clock time of each epoch's end (when each score was known)
        # --references full: reference configs run to the end (the final step retrains them
        # in full whichever mode is chosen); a study from before the option: full
        prunable = reference is None or self.cfg.references not in ("full", None)

        def on_epoch(result: EpochResult) -> None:
            seconds.append(result.seconds)
            ended.append(round(time.time(), 3))
            if result.val_accuracy > best["accuracy"]:
                best.update(accuracy=result.val_accuracy, epoch=result.epoch)
            if recorder.report(result.val_accuracy, result.epoch, prunable):
                raise optuna.TrialPruned(
                    f"pruned after epoch {result.epoch}: val accuracy {result.val_accuracy:.4f}"
                )

        end: dict = {}
        try:
            train_built(built, train, val, epochs=self.cfg.epochs,
                        batch_size=self.cfg.batch_size, seed=seed, on_epoch=on_epoch,
                        epoch_images=epoch_images, speed=speed, stop_at=self.deadline)
            end["best_epoch"] = best["epoch"]
        except TrialDiverged as exc:
            # a bad region of the space, not a broken run: prune, so the sampler learns it
            end["failure"] = str(exc)
            raise optuna.TrialPruned(str(exc)) from None
        except DeadlineReached as exc:  # the search's time is up: its value so far stands
            end["stopped"] = str(exc)
            raise optuna.TrialPruned(str(exc)) from None
        finally:
            if seconds:
                end["seconds_per_epoch"] = sum(seconds) / len(seconds)
                end["epoch_ended"] = ended
            if epoch_images is not None:
                # how many distinct augmented copies this trial trained on, and what
                # making or loading them cost it (included in seconds_per_epoch)
                end["augment_copies_seen"] = len(epoch_images.seen)
                end["augment_seconds"] = round(self.augment.stats.seconds - augment_seconds, 3)
            recorder.write(**end)  # with the reports not written yet
        if self.cfg.pareto:
            return (best["accuracy"], *cost.objective_values(self.cfg.objectives[1:]))
        return best["accuracy"]
