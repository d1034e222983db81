"""python -m search.replay: every trial of a study trained again equals its stored self,
epoch by epoch and in outcome, on the CPU; one line for each, never a traceback."""

from __future__ import annotations

import dataclasses
import os

import optuna
import pytest
import torch
from torch import nn

import storage
from search import registry
from search import replay as replay_module
from search.config import RunConfig
from search.objective import TRIAL_FAILURES, Objective
from search.registry import Built
from search.run import search
from search.study import open_study

TrialState = optuna.trial.TrialState


class _NaNLoss(nn.Module):
    def forward(self, scores, target):
        return nn.functional.cross_entropy(scores, target) * float("nan")


class _PruneAt(optuna.pruners.BasePruner):
    """Prunes every trial that is not a reference at epoch `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def prune(self, study, trial) -> bool:
        return "reference" not in trial.user_attrs and trial.last_step == self.step


def test_every_trial_replays_equal_pruned_diverged_and_unfit(tmp_path, monkeypatch, digits,
                                                              capsys):
    """A study of complete trials, trials pruned at epoch 4 (some whose 4th epoch was not
    their best: Optuna stores the last one), one that diverged and one too deep for the
    input: each replays equal, and the command prints one line for each."""
    spec = registry.get("mlp")

    def build(params, image_shape, *args):
        if params.widths == (33, 33, 33, 33):  # "does not fit" this input, in this test
            raise ValueError("4 hidden layers of 33 do not fit 8x8 images")
        built = spec.build(params, image_shape, *args)
        if params.pair == "gelu_margin":  # this pair diverges in this test
            return Built(built.model, _NaNLoss(), built.make_optimizer)
        return built

    monkeypatch.setattr(registry, "STUDIES",
                        {**registry.STUDIES, "mlp": dataclasses.replace(spec, build=build)})
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cfg = RunConfig(study="mlp", data="digits", epochs=6, storage=url, final=False,
                    workers=1, references="full")
    study = open_study(cfg, registry.get("mlp"), digits, storage.open(url), "mlp-digits")
    study.pruner = _PruneAt(4)
    lecture = spec.references["lecture"]
    # high learning rates: curves that go down as well as up
    for optimizer, lr in (("sgd", 0.3), ("sgd", 0.2), ("adam", 0.01), ("adam", 0.008)):
        study.enqueue_trial(spec.to_trial_params(dataclasses.replace(
            lecture, widths=(48,), optimizer=optimizer, lr=lr)))
    study.enqueue_trial(spec.to_trial_params(dataclasses.replace(lecture, pair="gelu_margin")))
    study.enqueue_trial(spec.to_trial_params(dataclasses.replace(lecture,
                                                                 widths=(33, 33, 33, 33))))
    objective = Objective(registry.get("mlp"), digits, cfg, torch.device("cpu"))
    study.optimize(objective, n_trials=8, catch=TRIAL_FAILURES)
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED and "failure" not in t.user_attrs]
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    assert len(pruned) == 4 and all(max(t.intermediate_values) == 4 for t in pruned)
    # the case a best-epoch comparison gets wrong: the last epoch is not the best
    assert any(t.value < max(t.intermediate_values.values()) for t in pruned)
    diverged, unfit = trials[6], trials[7]
    assert "became nan" in diverged.user_attrs["failure"]
    assert "does not fit" in unfit.user_attrs["failure"]

    for trial in trials:
        replayed = replay_module.replay(study, trial.number)
        assert replayed.equal, replayed.line()
        assert replayed.epochs.keys() == trial.intermediate_values.keys(), trial.number
        assert replayed.value == trial.value or trial.value is None
    capsys.readouterr()
    lines = {}
    for trial in trials:
        assert replay_module.main(["--storage", url, "--study-name", "mlp-digits",
                                   "--trial", str(trial.number)]) == 0
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        lines[trial.number] = out.strip()
        assert len(out.splitlines()) == 1 and out.strip().endswith(
            "epochs" if trial.intermediate_values else ": equal"), out
    assert lines[pruned[0].number].startswith(f"trial {pruned[0].number} (PRUNED): stored ")
    assert ", pruned after epoch 4, replayed " in lines[pruned[0].number]
    assert "(training loss became nan in epoch 1)" in lines[6]
    assert lines[7].startswith("trial 7 (PRUNED): stored no value (does not fit the input: "
                               "4 hidden layers of 33")


def test_a_replay_that_differs_says_from_which_epoch():
    replayed = replay_module.Replayed(3, "PRUNED", 0.5, {1: 0.4, 2: 0.6, 3: 0.5}, None,
                                      {1: 0.4, 2: 0.625, 3: 0.5}, 0.5, None)
    assert replayed.first_difference == 2 and not replayed.equal
    assert replayed.line().startswith(
        "trial 3 (PRUNED): stored 0.500000, pruned after epoch 3, replayed 0.500000: differs "
        "from epoch 2 (stored 0.600000, replayed 0.625000)")
    # the same curve, but the replay diverged at its end where the trial did not
    diverged = dataclasses.replace(replayed, epochs={1: 0.4, 2: 0.6, 3: 0.5},
                                   failure="training loss became nan in epoch 4")
    assert diverged.first_difference == 0
    assert "differs (see --help" in diverged.line()
    nan = dataclasses.replace(replayed, stored_epochs={1: float("nan")},
                              epochs={1: float("nan")}, stored_value=float("nan"),
                              value=float("nan"))
    assert nan.equal


@pytest.mark.parametrize("workers", [1, 2])
def test_replay_retrains_a_trial_to_its_stored_value(tmp_path, capsys, workers):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cfg = RunConfig(study="mlp", data="digits", n_trials=6, epochs=3, storage=url,
                    final=False, pruner="median", workers=workers)
    study, _, _ = search(cfg)
    # workers sharing the cores ran single-threaded; replay uses each trial's own count
    assert {t.user_attrs["threads"] for t in study.trials if "threads" in t.user_attrs} == (
        {torch.get_num_threads()} if workers == 1 else {max(1, (os.cpu_count() or 1) // 2)})
    for trial in study.trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            replayed = replay_module.replay(study, trial.number)
            assert replayed.equal and replayed.value == trial.value, replayed.line()
    capsys.readouterr()
    assert replay_module.main(["--storage", url, "--study-name", "mlp-digits",
                               "--trial", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trial 3 (") and out.strip().endswith(": equal at each of its "
                                                                "3 epochs")
    assert replay_module.main(["--storage", url, "--study-name", "mlp-digits",
                               "--trial", "99"]) == 2
    assert "has no trial 99" in capsys.readouterr().err


def test_replay_trains_with_the_speed_settings_its_trial_recorded(tmp_path, monkeypatch):
    """A trial from before fused optimizers and bf16 MLPs (its `speed` reads "float32")
    replays with those settings, not with what Speed.of picks today."""
    from search import objective
    from search.models import MLP
    from search.train import Speed

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cfg = RunConfig(study="mlp", data="digits", n_trials=3, epochs=3, storage=url,
                    final=False, pruner="none", workers=1)
    with monkeypatch.context() as patched:  # the trials train as the older release did
        patched.setattr(objective.Speed, "of", classmethod(lambda cls, model, device: Speed()))
        study, _, _ = search(cfg)
    assert Speed.of(MLP(4, (2,), 2), torch.device("cpu")) != Speed()  # today's differ
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert trials and {t.user_attrs["speed"] for t in trials} == {"float32"}
    for trial in trials:
        replayed = replay_module.replay(study, trial.number)
        assert replayed.equal and replayed.value == trial.value, replayed.line()
