"""The trainer: it learns, it is reproducible, and it stops on a diverging loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.errors import ConfigError, TrialDiverged
from search.models import CNN, MLP
from search.train import (
    DeviceSplit,
    Speed,
    evaluate_accuracy,
    fit,
    make_optimizer,
    make_scheduler,
    predict_scores,
    resolve_device,
)


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


@pytest.mark.parametrize("patience", [None, 1, 3])
def test_patience_stops_once_the_best_is_that_many_epochs_old(digits, patience):
    model = MLP(64, (8,), 10)
    split = DeviceSplit.of(digits.train, torch.device("cpu"))
    # a learning rate of 0: the weights, hence the accuracy, never change after epoch 1,
    # so epoch 1 stays the best (a tie does not count as better)
    history = fit(model, nn.CrossEntropyLoss(), make_optimizer("sgd", model, 0.0), split,
                  split, epochs=6, batch_size=256, seed=0, patience=patience)
    assert len({r.val_accuracy for r in history}) == 1
    assert len(history) == (6 if patience is None else 1 + patience)


def test_unknown_optimizer_and_devices():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("rmsprop-ish", MLP(4, (2,), 2), 0.1)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("toaster")


def test_onecycle_schedule_steps_every_batch(digits):
    model = MLP(64, (8,), 10)
    optimizer = make_optimizer("adam", model, 0.01)
    scheduler = make_scheduler("onecycle", optimizer, 0.01, total_steps=20)
    split = DeviceSplit.of(digits.train, torch.device("cpu"))
    lrs = []
    fit(model, nn.CrossEntropyLoss(), optimizer, split, split, epochs=1, batch_size=64,
        seed=0, scheduler=scheduler, on_epoch=lambda r: lrs.append(optimizer.param_groups[0]
                                                                   ["lr"]))
    assert scheduler.last_epoch == -(-len(split) // 64)  # one step per batch
    assert lrs[0] != 0.01 and make_scheduler("constant", optimizer, 0.01, 20) is None
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        make_scheduler("warm-restarts", optimizer, 0.01, 20)


def test_epoch_images_replace_the_training_images_but_not_labels(digits):
    split = DeviceSplit.of(digits.train, torch.device("cpu"))
    blank = torch.zeros_like(split.x)
    asked = []

    def epoch_images(epoch):
        asked.append(epoch)
        return blank

    torch.manual_seed(0)
    model = MLP(64, (16,), 10)
    history = fit(model, nn.CrossEntropyLoss(), make_optimizer("adam", model, 1e-2), split,
                  DeviceSplit.of(digits.val, torch.device("cpu")), epochs=3, batch_size=64,
                  seed=0, epoch_images=epoch_images)
    assert asked == [1, 2, 3]
    # trained on blank images the net learns only the class prior: near chance on real ones
    assert history[-1].val_accuracy < 0.3


def test_speed_settings_per_model_and_device():
    cpu = torch.device("cpu")
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    bf16 = torch.bfloat16 if native_bf16 else None
    # bf16 autocast wherever the CPU has it, channels_last for convolutions only, and the
    # optimizer's fused kernel everywhere
    assert Speed.of(MLP(4, (2,), 2), cpu) == Speed(False, bf16, fused=True)
    assert Speed.of(CNN((1, 8, 8), (4,), 2), cpu) == Speed(native_bf16, bf16, fused=True)
    assert Speed(True, torch.bfloat16).describe() == "channels_last, bfloat16 autocast"
    assert Speed(fused=True).describe() == "float32, fused optimizer"


@pytest.mark.parametrize(("capability", "autocast"), [((7, 0), None), ((7, 5), None),
                                                     ((8, 0), torch.bfloat16),
                                                     ((9, 0), torch.bfloat16)])
def test_gpu_precision_follows_the_workers_own_gpu(monkeypatch, capability, autocast):
    """bf16 autocast on compute capability 8.0 and above, float32 below, asked of the
    worker's own device (cuda:1 here), not of the current one; recorded as the trial's
    `speed`."""
    asked = []

    def device_capability(device=None):
        asked.append(str(device))
        return capability if str(device) == "cuda:1" else (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    speed = Speed.of(CNN((1, 8, 8), (4,), 2), torch.device("cuda:1"))
    assert speed == Speed(True, autocast, fused=True) and asked == ["cuda:1"]
    assert speed.describe() == ("channels_last, bfloat16 autocast, fused optimizer"
                                if autocast else "channels_last, float32, fused optimizer")
    assert Speed.parse(speed.describe()) == speed


@pytest.mark.parametrize("speed", [Speed(), Speed(fused=True), Speed(False, torch.bfloat16),
                                   Speed(True, torch.bfloat16, True),
                                   Speed(False, torch.float16, True)])
def test_a_stored_speed_reads_back_as_the_settings_that_wrote_it(speed):
    assert Speed.parse(speed.describe()) == speed


def test_speed_text_from_older_trials_and_foreign_text():
    # what trials stored before fused optimizers: read as unfused
    assert Speed.parse("float32") == Speed()
    assert Speed.parse("channels_last, bfloat16 autocast") == Speed(True, torch.bfloat16)
    with pytest.raises(ValueError, match="not a speed setting"):
        Speed.parse("float32, turbo")


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimizers_take_the_same_steps_as_the_plain_ones(name):
    """fused=True changes the kernel, not the update: after a few steps on the same
    gradients the weights agree to float rounding."""
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = MLP(6, (5,), 3)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        optimizer = make_optimizer(name, model, 0.05, fused=fused)
        assert bool(optimizer.defaults.get("fused")) == fused
        for step in range(5):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    assert (weights[1] - start).abs().max() > 1e-3  # it did train


def test_a_cnn_learns_with_the_fast_settings_and_scores_in_float32(digits):
    torch.manual_seed(0)
    model = CNN((1, 8, 8), (16, 32), 10, batch_norm=True, mean=(digits.mean,),
                std=(digits.std,))
    train = DeviceSplit.of(digits.train, torch.device("cpu"))
    val = DeviceSplit.of(digits.val, torch.device("cpu"))
    history = fit(model, nn.CrossEntropyLoss(), make_optimizer("adam", model, 3e-3), train,
                  val, epochs=4, batch_size=64, seed=0)
    assert history[-1].val_accuracy > 0.85
    scores = predict_scores(model, val.x)
    assert scores.dtype == torch.float32


def test_scoring_batches_shrink_with_the_input_size_not_the_number_of_images(monkeypatch):
    """eval_batch sizes a scoring pass by one image's activations: VGG16 at 224 px (49x the
    first layer's output at 32 px) gets batches of at most a 40th; the scores are those of
    one pass over every image, whatever the batch."""
    from search import train as train_module
    from search.models.vgg16 import FrozenVGG16
    from search.train import eval_batch

    torch.manual_seed(0)
    small, large = (FrozenVGG16(10, input_size=size).eval() for size in (32, 224))
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    at_32, at_224 = eval_batch(small, images), eval_batch(large, images)
    # the first conv's output, 64 channels x 224 x 224 float32, three times: 38.5 MB
    assert at_224 == train_module.EVAL_BYTES // (3 * 64 * 224 * 224 * 4)
    assert at_224 <= at_32 // 40
    assert eval_batch(small, images[:1]) == at_32  # not a function of how many images
    model = CNN((1, 28, 28), (8, 16), 10)
    whole = predict_scores(model, images)
    monkeypatch.setattr(train_module, "EVAL_BYTES", 1)  # one image a pass
    train_module._eval_batches.clear()
    assert eval_batch(model, images) == 1
    assert torch.allclose(predict_scores(model, images), whole, atol=1e-6)
