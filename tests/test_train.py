"""The trainer: it learns, it is reproducible, and it stops on a diverging loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.errors import ConfigError, TrialDiverged
from search.models import MLP
from search.train import DeviceSplit, evaluate_accuracy, fit, make_optimizer, resolve_device


def _train(digits, seed=0, epochs=3, loss_fn=None, lr=1e-3):
    torch.manual_seed(seed)
    model = MLP(64, (64,), 10, mean=digits.mean, std=digits.std)
    train = DeviceSplit.of(digits.train, torch.device("cpu"))
    val = DeviceSplit.of(digits.val, torch.device("cpu"))
    history = fit(model, loss_fn or nn.CrossEntropyLoss(), make_optimizer("adam", model, lr),
                  train, val, epochs=epochs, batch_size=64, seed=seed)
    return model, history


def test_fit_learns_and_reports_every_epoch(digits):
    model, history = _train(digits, epochs=5)
    assert [r.epoch for r in history] == [1, 2, 3, 4, 5]
    assert history[-1].val_accuracy > 0.85
    assert history[-1].train_loss < history[0].train_loss
    val = DeviceSplit.of(digits.val, torch.device("cpu"))
    assert evaluate_accuracy(model, val) == pytest.approx(history[-1].val_accuracy)


def test_same_seed_same_history(digits):
    _, first = _train(digits, seed=3)
    _, second = _train(digits, seed=3)
    _, other = _train(digits, seed=4)
    assert [r.train_loss for r in first] == [r.train_loss for r in second]
    assert [r.train_loss for r in first] != [r.train_loss for r in other]


class NaNLoss(nn.Module):
    def forward(self, scores, target):
        return nn.functional.cross_entropy(scores, target) * float("nan")


def test_nan_loss_raises_diverged(digits):
    with pytest.raises(TrialDiverged, match="nan in epoch 1"):
        _train(digits, loss_fn=NaNLoss())


def test_on_epoch_can_stop_training(digits):
    calls = []

    def stop(result):
        calls.append(result.epoch)
        raise StopIteration

    model = MLP(64, (8,), 10)
    split = DeviceSplit.of(digits.train, torch.device("cpu"))
    with pytest.raises(StopIteration):
        fit(model, nn.CrossEntropyLoss(), make_optimizer("sgd", model, 0.01), split, split,
            epochs=4, batch_size=256, seed=0, on_epoch=stop)
    assert calls == [1]


def test_unknown_optimizer_and_devices():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("rmsprop-ish", MLP(4, (2,), 2), 0.1)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("toaster")
