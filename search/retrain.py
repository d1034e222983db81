"""Retraining one configuration with several seeds, for the final step of `search.run`.

Each seed trains on the training split for up to a bound of epochs, stops early once
validation accuracy has not improved for `patience` epochs, and keeps the weights of its
best validation epoch (not the last). Test metrics are computed here, after training, on
the CPU, for the report's comparison; nothing here chooses anything by test score: the best
seed is the best on validation.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from search import metrics as metrics_module
from search.augment import AugmentCache
from search.data import Dataset
from search.errors import TrialDiverged
from search.features import FeatureCache, feature_split
from search.models import count_parameters
from search.registry import StudySpec
from search.train import DeviceSplit, EpochResult, predict_scores, train_built

log = logging.getLogger(__name__)


@dataclass
class SeedRun:
    seed: int
    history: list[EpochResult]
    best_epoch: int
    val_accuracy: float
    state: dict  # CPU state_dict of the best validation epoch
    test: dict  # metrics.compute() on the test split

    @property
    def seconds_per_epoch(self) -> float:
        return statistics.fmean(r.seconds for r in self.history)

    @property
    def epochs_trained(self) -> int:
        return len(self.history)


@dataclass
class ConfigResult:
    label: str
    params: object
    n_parameters: int
    runs: list[SeedRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def best_run(self) -> SeedRun:
        """The seed with the best validation accuracy (never chosen on test)."""
        return max(self.runs, key=lambda r: r.val_accuracy)

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return {"mean": statistics.fmean(values), "std": spread, "values": values}

        if not self.runs:  # every seed diverged: what there is to say, no statistics
            return {"label": self.label, "n_parameters": self.n_parameters, "seeds": [],
                    "diverged": True, "failures": self.failures}
        return {
            "label": self.label,
            "n_parameters": self.n_parameters,
            "seeds": [r.seed for r in self.runs],
            "val_accuracy": stats([r.val_accuracy for r in self.runs]),
            "test_accuracy": stats([r.test["accuracy"] for r in self.runs]),
            "macro_f1": stats([r.test["macro_f1"] for r in self.runs]),
            "seconds_per_epoch": statistics.fmean(r.seconds_per_epoch for r in self.runs),
            "best_epochs": [r.best_epoch for r in self.runs],
            "epochs_trained": [r.epochs_trained for r in self.runs],
            "failures": self.failures,
        }


def retrain(spec: StudySpec, params, label: str, dataset: Dataset, *, seeds: list[int],
            epochs: int, batch_size: int, device: torch.device, augment: AugmentCache,
            patience: int | None = None, features: FeatureCache | None = None,
            input_size: int = 32, progress: Callable[[str], None] | None = None
            ) -> ConfigResult:
    """Train `params` once per seed for up to `epochs` (stopped after `patience` epochs
    without a better validation accuracy; None: never), augmented copies from `augment`
    where the params ask for them; a frozen-backbone study (spec.feature_head) trains its
    head on `features`, and a SeedRun's state is then the head's. A seed whose loss
    diverges is recorded and skipped. `progress` is told of each seed once it is done."""
    n_classes = len(dataset.classes)
    if features is None:
        train = DeviceSplit.of(dataset.train, device)
        val = DeviceSplit.of(dataset.val, device)
        test_x = dataset.test.x

        def build():
            return spec.build(params, dataset.image_shape, n_classes, dataset.channel_mean,
                              dataset.channel_std)
    else:
        head = spec.feature_head(params)
        train, val = (feature_split(features, name, head, input_size, split.y, device)
                      for name, split in (("train", dataset.train), ("val", dataset.val)))
        test_x = features.get("test", head, input_size)

        def build():
            return spec.build_head(params, train.x.shape[1], n_classes)
    result: ConfigResult | None = None
    for seed in seeds:
        torch.manual_seed(seed)
        built = build()
        model = built.model.to(device)
        if result is None:
            result = ConfigResult(label, params, count_parameters(model))
        best = {"accuracy": -1.0, "epoch": 0, "state": None}

        def keep_best(epoch: EpochResult, model=model, best=best) -> None:
            if epoch.val_accuracy > best["accuracy"]:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best.update(accuracy=epoch.val_accuracy, epoch=epoch.epoch, state=state)

        try:
            history = train_built(
                built, train, val, epochs=epochs, batch_size=batch_size, seed=seed,
                on_epoch=keep_best, patience=patience,
                epoch_images=augment.epoch_images(built.augment, seed, epochs, device))
        except TrialDiverged as exc:
            log.warning("%s seed %d diverged: %s", label, seed, exc)
            result.failures.append(f"seed {seed}: {exc}")
            if progress is not None:
                progress(f"{label} seed {seed}: diverged")
            continue
        model = model.cpu()
        model.load_state_dict(best["state"])
        predicted = predict_scores(model, test_x).argmax(1).numpy()
        test = metrics_module.compute(dataset.test.y.numpy(), predicted, dataset.classes)
        result.runs.append(SeedRun(seed, history, best["epoch"], best["accuracy"],
                                   best["state"], test))
        done = (f"{label} seed {seed}: best val {best['accuracy']:.4f} at epoch "
                f"{best['epoch']} of {len(history)}, test {test['accuracy']:.4f}")
        if progress is None:
            log.info("final %s", done)
        else:
            progress(done)
    assert result is not None
    return result
