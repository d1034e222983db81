"""The objective every trial of `python -m search.run` calls: a class holding loaded data.

Data is loaded and moved to the device once, in __init__; a trial only samples params,
builds the model through the study's builder, trains, and returns the best validation
accuracy over its epochs. The test split is not given to this class at all.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import optuna
import torch

import storage
from search import budget
from search.augment import AugmentCache
from search.config import RunConfig, trial_seed
from search.data import Dataset
from search.errors import TrialDiverged
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


class Objective:
    def __init__(self, spec: StudySpec, dataset: Dataset, cfg: RunConfig,
                 device: torch.device, weights: VGGWeights | None = None,
                 speed: Speed | None = None) -> None:
        """`speed`: train every trial with these settings (a replay, those its trial had);
        None: Speed.of each trial's model on `device`."""
        self.spec = spec
        self.cfg = cfg
        self.device = device
        self.speed = speed
        self.image_shape = dataset.image_shape
        self.n_classes = len(dataset.classes)
        self.mean, self.std = dataset.channel_mean, dataset.channel_std
        self.train = DeviceSplit.of(dataset.train, device)
        self.val = DeviceSplit.of(dataset.val, device)
        # augmented copies of the training split, shared by every trial (search.augment)
        cache = storage.cache_dir(cfg.storage, cfg.cache_dir)
        self.augment = AugmentCache.for_dataset(dataset, cache / "augment")
        # a frozen backbone's outputs, computed once (search.features); never the test split
        self.features = None
        if spec.feature_head is not None:
            self.features = FeatureCache(
                {"train": dataset.train.x, "val": dataset.val.x}, dataset.name,
                weights or resolve_weights(cfg.weights, cfg.seed), cache / "features", device)
            for split in ("train", "val"):  # before any trial: trials never run the backbone
                for head in HEADS:
                    self.features.get(split, head, cfg.input_size)

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

    def __call__(self, trial: optuna.Trial) -> float:
        # which process runs it: a parent whose worker died fails and retries its trial
        trial.set_user_attr("worker", worker_id())
        if budget.over_budget(trial.study, trial.number):
            trial.set_user_attr(budget.OVER_BUDGET, True)
            trial.study.stop()
            raise optuna.TrialPruned("the study's --max-trials is used up")
        params = self.spec.suggest(trial)
        seed = trial_seed(self.cfg.seed, trial.number)
        torch.manual_seed(seed)  # weight init and dropout masks
        computed = len(self.features.computed) if self.features is not None else 0
        train, val, build = self._inputs(params)
        try:
            built = build()
        except ValueError as exc:  # params the builder refuses for this input shape
            trial.set_user_attr("failure", f"does not fit the input: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        model = built.model.to(self.device)
        epoch_images = self.augment.epoch_images(built.augment, seed, self.cfg.epochs,
                                                 self.device)
        augment_seconds = self.augment.stats.seconds
        reference = trial.user_attrs.get("reference")
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("settings", self.cfg.trial_settings())
        trial.set_user_attr("device", str(self.device))
        # CPU threads: another count sums in another order, so a replay uses the same
        trial.set_user_attr("threads", torch.get_num_threads())
        speed = self.speed or Speed.of(model, self.device)
        trial.set_user_attr("speed", speed.describe())
        trial.set_user_attr("n_parameters", count_parameters(model))
        if self.features is not None:  # did this trial have to run the backbone?
            trial.set_user_attr("backbone_runs", len(self.features.computed) - computed)
        best = {"accuracy": 0.0, "epoch": 0}
        seconds: list[float] = []
        ended: list[float] = []  # wall-clock time of each epoch's end (when each score was known)

        def on_epoch(result: EpochResult) -> None:
            seconds.append(result.seconds)
            ended.append(round(time.time(), 3))
            if result.val_accuracy > best["accuracy"]:
                best.update(accuracy=result.val_accuracy, epoch=result.epoch)
            trial.report(result.val_accuracy, result.epoch)
            # --references full: reference configs run to the end (the final step retrains
            # them in full whichever mode is chosen); a study from before the option: full
            prunable = reference is None or self.cfg.references not in ("full", None)
            if prunable and trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned after epoch {result.epoch}: val accuracy {result.val_accuracy:.4f}"
                )

        try:
            train_built(built, train, val, epochs=self.cfg.epochs,
                        batch_size=self.cfg.batch_size, seed=seed, on_epoch=on_epoch,
                        epoch_images=epoch_images, speed=speed)
        except TrialDiverged as exc:
            # a bad region of the space, not a broken run: prune, so the sampler learns it
            trial.set_user_attr("failure", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except RuntimeError as exc:
            if not _is_out_of_memory(exc):
                raise
            trial.set_user_attr("failure", f"out of memory: {str(exc).splitlines()[0]}")
            del model, built
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise TrialOutOfMemory(str(exc).splitlines()[0]) from None
        finally:
            if seconds:
                trial.set_user_attr("seconds_per_epoch", sum(seconds) / len(seconds))
                trial.set_user_attr("epoch_ended", ended)
            if epoch_images is not None:
                # how many distinct augmented copies this trial trained on, and what
                # making or loading them cost it (included in seconds_per_epoch)
                trial.set_user_attr("augment_copies_seen", len(epoch_images.seen))
                trial.set_user_attr("augment_seconds", round(
                    self.augment.stats.seconds - augment_seconds, 3))
        trial.set_user_attr("best_epoch", best["epoch"])
        return best["accuracy"]
