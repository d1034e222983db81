"""python -m search.replay --study-name NAME --trial N [--storage URL] [--device cpu]

Trains trial N of a stored study again, from its stored params, seed and settings (epochs,
batch size, precision and optimizer kernel; the data the study recorded), through the same
Objective the search used, and prints the validation accuracy it reaches beside the stored
one, epoch by epoch where the trial was pruned. On the CPU the two are equal (the replay
uses the trial's thread count: another count sums floats in another order); trials run on a
GPU (cuDNN picks kernels per run) can differ in the last digits.
"""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import optuna
import torch

import storage
from search import registry
from search.cli import Parser, setup_logging
from search.errors import ConfigError
from search.models.vgg16 import resolve_weights
from search.objective import Objective
from search.study import config_of_study, last_value, load_existing, load_study_data
from search.train import Speed, resolve_device

log = logging.getLogger(__name__)


class ReplayTrial(optuna.trial.FixedTrial):
    """A stored trial's params, number and reference tag, its epochs recorded, never pruned,
    outside any study (nothing is written to the storage)."""

    def __init__(self, stored: optuna.trial.FrozenTrial) -> None:
        super().__init__(stored.params, number=stored.number)
        if "reference" in stored.user_attrs:  # a reference config trains as it did
            self.set_user_attr("reference", stored.user_attrs["reference"])
        self.study = SimpleNamespace(user_attrs={}, stop=lambda: None)  # no budget here
        self.epochs: dict[int, float] = {}

    def report(self, value: float, step: int) -> None:
        self.epochs[step] = value

    def should_prune(self) -> bool:
        return False


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
           data_dir: str | None = None) -> tuple[float | None, float, ReplayTrial]:
    """(stored value, replayed value at the same epoch, the replayed trial)."""
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
    trial = ReplayTrial(stored)
    threads = torch.get_num_threads()
    # as many CPU threads as the trial had (a worker sharing the cores had fewer): the same
    # sums in the same order
    torch.set_num_threads(int(stored.user_attrs.get("threads", threads)))
    speed = _stored_speed(stored)
    try:
        value = Objective(spec, dataset, cfg, torch.device(cfg.device), weights, speed)(trial)
    finally:
        torch.set_num_threads(threads)
    if stored.state != optuna.trial.TrialState.COMPLETE and stored.intermediate_values:
        step = max(stored.intermediate_values)  # pruned: compare where it stopped
        value = max(v for s, v in trial.epochs.items() if s <= step)
    return last_value(stored), value, trial


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = Parser(prog="python -m search.replay", description=__doc__.splitlines()[0])
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--trial", type=int, required=True, help="the trial's number")
    parser.add_argument("--storage", default=storage.DEFAULT_URL)
    parser.add_argument("--device", default="cpu",
                        help="cpu (default: the one on which a replay equals its trial) or cuda")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)  # a bad device is refused before anything is read
        study, _ = load_existing(args.storage, args.study_name)
        stored, value, trial = replay(study, args.trial, args.device, args.data_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = next(t.state.name for t in study.trials if t.number == args.trial)
    if stored is None:
        print(f"trial {args.trial} ({state}) stored no value; replayed {value:.6f}")
        return 0
    same = abs(stored - value) < 1e-9
    print(f"trial {args.trial} ({state}): stored {stored:.6f}, replayed {value:.6f}: "
          + ("equal" if same else f"differs by {value - stored:+.6f} (see --help: GPU "
             "kernels and several workers are not bit-for-bit repeatable)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
