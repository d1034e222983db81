"""python -m search.replay --study-name NAME --trial N [--storage URL] [--device cpu]

Trains trial N of a stored study again, from its stored params, seed and settings (epochs,
batch size, precision and optimizer kernel; the data the study recorded), through the same
Objective the search used, and sets it beside the stored trial epoch by epoch: each epoch's
validation accuracy, the trial's value (a complete trial's best epoch, a pruned one's last)
and its outcome (complete, stopped by the pruner at the same epoch, diverged, did not fit,
out of memory). One line says equal, or from which epoch they differ. On the CPU the two are
equal (the replay uses the trial's thread count: another count sums floats in another
order). On a GPU (--device cuda) the replay trains with the trial's precision and layout
and cuDNN's autotuner on, as the trial did, but the autotuner may pick other kernels in
this process and some CUDA kernels add in a nondeterministic order: a GPU replay can differ
from its trial in the last digits, and says from which epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from types import SimpleNamespace

import optuna
import torch
from optuna.trial import TrialState

import storage
from search import data as data_module
from search import registry
from search.cli import Parser, describe, run_command, setup_logging
from search.errors import ConfigError
from search.models.vgg16 import resolve_weights
from search.objective import TRIAL_FAILURES, Objective
from search.study import config_of_study, last_value, load_existing, load_study_data
from search.train import Speed, resolve_device

log = logging.getLogger(__name__)


class ReplayTrial(optuna.trial.FixedTrial):
    """A stored trial's params, number and reference tag, its epochs recorded, outside any
    study (nothing is written to the storage). It stops after epoch `stop_after` (where its
    stored trial was pruned), and is never pruned otherwise."""

    def __init__(self, stored: optuna.trial.FrozenTrial, stop_after: int | None = None) -> None:
        super().__init__(stored.params, number=stored.number)
        if "reference" in stored.user_attrs:  # a reference config trains as it did
            self.set_user_attr("reference", stored.user_attrs["reference"])
        # no budget here; one direction, so that the trainer asks this trial's should_prune
        # (where it stops) whatever the study's objectives
        self.study = SimpleNamespace(user_attrs={}, stop=lambda: None,
                                     directions=(optuna.study.StudyDirection.MAXIMIZE,))
        self.epochs: dict[int, float] = {}
        self.stop_after = stop_after

    def report(self, value: float, step: int) -> None:
        self.epochs[step] = value

    def should_prune(self) -> bool:
        return self.stop_after is not None and max(self.epochs, default=0) >= self.stop_after


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


@dataclasses.dataclass
class Replayed:
    """A stored trial and its replay, epoch by epoch and in outcome."""

    number: int
    stored_state: str  # COMPLETE, PRUNED or FAIL
    stored_value: float | None  # COMPLETE: the best epoch's; PRUNED: the last report's
    stored_epochs: dict[int, float]  # the validation accuracy it reported, by epoch
    stored_failure: str | None  # why it was pruned or failed, where not by the pruner
    epochs: dict[int, float]  # the replay's, by epoch
    value: float | None  # the replay's value, as the stored one is defined
    failure: str | None  # the replay's, when it diverged, did not fit or ran out of memory

    @property
    def first_difference(self) -> int | None:
        """The first epoch whose validation accuracy differs, 0 when both reach the end
        alike but their values or outcomes differ, None when the replay equals the trial."""
        for epoch in sorted(self.stored_epochs):
            if not _same(self.stored_epochs[epoch], self.epochs.get(epoch)):
                return epoch
        if (self.stored_failure is None) != (self.failure is None) or not _same(
                self.stored_value, self.value):
            return 0
        return None

    @property
    def equal(self) -> bool:
        return self.first_difference is None

    def line(self) -> str:
        """One line: what was stored, what the replay reached, equal or where they differ."""
        stored = self._outcome(self.stored_value, self.stored_failure)
        if self.stored_state == "PRUNED" and self.stored_failure is None:
            stored += f", pruned after epoch {max(self.stored_epochs)}"
        head = f"trial {self.number} ({self.stored_state}): stored {stored}, replayed " \
               f"{self._outcome(self.value, self.failure)}"
        epochs = len(self.stored_epochs)
        at = self.first_difference
        if at is None:
            return f"{head}: equal" + (f" at each of its {epochs} epochs" if epochs else "")
        where = "" if at == 0 else (
            f" from epoch {at} (stored {self.stored_epochs[at]:.6f}, replayed "
            f"{self._value(self.epochs.get(at))})")
        return (f"{head}: differs{where} (see --help: GPU kernels and several workers are "
                "not bit-for-bit repeatable)")

    @staticmethod
    def _value(value: float | None) -> str:
        return "no value" if value is None else f"{value:.6f}"

    def _outcome(self, value: float | None, failure: str | None) -> str:
        return self._value(value) if failure is None else f"{self._value(value)} ({failure})"


def _stored_speed(stored: optuna.trial.FrozenTrial) -> Speed | None:
    """The precision, layout and optimizer kernel the trial trained with (its `speed`
    attribute), or None (today's settings for the device) when it has none this release
    reads."""
    text = stored.user_attrs.get("speed")
    try:
        return None if text is None else Speed.parse(str(text))
    except ValueError:
        log.warning("trial %d recorded speed settings %r, which this release does not know; "
                    "replaying with this device's own", stored.number, text)
        return None


def replay(study: optuna.Study, number: int, device: str = "cpu",
           data_dir: str | None = None) -> Replayed:
    """Train trial `number` of `study` again and set it beside the stored one. Raises
    ConfigError when the study has no such trial with params, or its data is not found."""
    stored = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if stored is None or not stored.params:
        raise ConfigError(f"study {study.study_name!r} has no trial {number} with params "
                          f"(it has {len(study.trials)} trials, numbered from 0)")
    settings = stored.user_attrs.get("settings", {})  # what the trial ran with
    cfg = config_of_study(study, device=device, data_dir=data_dir, seed=settings.get("seed"),
                          **{key: settings.get(key, stored.user_attrs.get(key))
                             for key in ("epochs", "batch_size")})
    spec = registry.get(cfg.study)
    dataset = load_study_data(study, cfg)
    weights = resolve_weights(cfg.weights, cfg.seed) if spec.feature_head else None
    stored_failure = stored.user_attrs.get("failure")
    pruned_by_pruner = stored.state == TrialState.PRUNED and stored_failure is None
    # a trial the pruner stopped is replayed to the same epoch (its learning-rate schedule
    # still spans the study's epochs, as the trial's did)
    trial = ReplayTrial(stored, max(stored.intermediate_values, default=None)
                        if pruned_by_pruner else None)
    threads = torch.get_num_threads()
    # as many CPU threads as the trial had (a worker sharing the cores had fewer): the same
    # sums in the same order
    torch.set_num_threads(int(stored.user_attrs.get("threads", threads)))
    speed = _stored_speed(stored)
    if torch.device(cfg.device).type == "cuda":
        # every CUDA trial ran with cuDNN's autotuner on (search.train.Speed.of sets it);
        # it may still pick other kernels in this process (see the module doc)
        torch.backends.cudnn.benchmark = True
    value, failure = None, None
    try:
        value = Objective(spec, dataset, cfg, torch.device(cfg.device), weights, speed)(trial)
        if isinstance(value, tuple):  # a Pareto search's: accuracy, then its costs
            value = value[0]
    except optuna.TrialPruned as exc:  # stopped where its trial was, or diverged, or unfit
        failure = trial.user_attrs.get("failure") or (None if trial.should_prune() else str(exc))
    except TRIAL_FAILURES as exc:  # out of memory
        failure = f"out of memory: {exc}"
    finally:
        torch.set_num_threads(threads)
    if stored.state != TrialState.COMPLETE and trial.epochs:
        value = trial.epochs[max(trial.epochs)]  # as Optuna stores a pruned trial's value
    return Replayed(number, stored.state.name, last_value(stored),
                    dict(stored.intermediate_values), stored_failure, dict(trial.epochs),
                    value, failure)


def build_parser() -> Parser:
    parser = Parser(prog="python -m search.replay", description=describe(__doc__))
    parser.add_argument("--study-name", required=True, metavar="NAME",
                        help="the study the trial belongs to; required")
    parser.add_argument("--trial", type=int, required=True, metavar="N",
                        help="the trial's number; required")
    parser.add_argument("--storage", default=storage.DEFAULT_URL, metavar="URL",
                        help="where the study is kept (as search.run's --storage)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="cpu (where a replay equals its trial bit for bit), cuda or "
                        "cuda:N")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the study's IDX files, "
                        "if they moved since the search")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> None:
        resolve_device(args.device)  # bad flags are refused before anything is read
        data_module.check_data_dir(args.data_dir)
        study, _ = load_existing(args.storage, args.study_name)
        print(replay(study, args.trial, args.device, args.data_dir).line())

    return run_command(body, "the study is unchanged (a replay writes nothing)")


if __name__ == "__main__":
    sys.exit(main())
