"""The studies `python -m search.run --study NAME` knows: one StudySpec each.

A spec ties a search space (spaces/*.py) to the builder that turns its params into a model,
loss and optimizer. The search and the final retrain both go through `spec.build`, so a
model rebuilt from stored params is the model that was scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import optuna
from torch import nn

from search.augment import AugmentSpec
from search.errors import ConfigError
from search.models import CNN, MLP, PAIRS
from search.models.vgg16 import FrozenVGG16, make_head
from search.train import make_optimizer, make_scheduler
from spaces import cnn as cnn_space
from spaces import mlp as mlp_space
from spaces import vgg16 as vgg16_space

# PyTorch's MNIST example normalizes with these, whatever the data (the lecture CNN does)
LECTURE_MEAN, LECTURE_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Built:
    """What one set of params trains: the model, its loss and its optimizer."""

    model: nn.Module
    loss_fn: nn.Module
    # (model, fused) -> optimizer; called after the model is moved to its device, so the
    # optimizer holds those tensors (fused: search.train.make_optimizer)
    make_optimizer: Callable[..., Any]
    # (optimizer, total steps) -> a per-batch schedule, or None for a constant rate
    make_scheduler: Callable[[Any, int], Any] = lambda optimizer, steps: None
    augment: AugmentSpec = AugmentSpec()  # applied to the training images only


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    space_version: str
    suggest: Callable[[optuna.Trial], Any]
    to_trial_params: Callable[[Any], dict]
    # build(params, image_shape (C, H, W), n_classes, mean, std) -> Built, with the
    # training split's per-channel mean and std (a float for an old single-channel model)
    build: Callable[..., Built]
    describe: Callable[[Any], str]  # one line per config for the report
    default_data: str
    default_epochs: int  # the most epochs per trial (on small data, all of them)
    references: Mapping[str, Any] = field(default_factory=dict)
    augments: bool = False  # params carry an AugmentSpec (`params.augment`)
    # --epochs unset: about this many optimizer steps per trial, in at least MIN_EPOCHS and
    # at most default_epochs epochs (None: always default_epochs)
    steps_per_trial: int | None = None
    # trials at once on one GPU (--workers-per-device): a small model alone leaves most of
    # a GPU idle (chosen from model sizes, not yet measured on a GPU)
    workers_per_gpu: int = 1
    # --references unset: whether the search runs the reference configs (REFERENCE_MODES)
    default_references: str = "full"
    # studies on a frozen backbone (vgg16): params -> the head kind, whose cached backbone
    # features trials train on; build_head(params, n_features, n_classes) -> Built (the head)
    feature_head: Callable[[Any], str] | None = None
    build_head: Callable[..., Built] | None = None


MIN_EPOCHS = 3


def epochs_for(spec: StudySpec, n_train: int, batch_size: int) -> int:
    """Epochs per trial when --epochs is not given: the study's default on small data; on
    large data, enough epochs for about `spec.steps_per_trial` optimizer steps (an epoch of
    60,000 images is 19x one of 3,200; the number is from benchmarks/mlp_schedule.py on
    MNIST, benchmarks/RESULTS.md "Defaults")."""
    if spec.steps_per_trial is None:
        return spec.default_epochs
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    wanted = math.ceil(spec.steps_per_trial / steps_per_epoch)
    return max(min(MIN_EPOCHS, spec.default_epochs), min(spec.default_epochs, wanted))


def saved_options(spec: StudySpec, input_size: int) -> dict:
    """The builder options of the model the final step saves (a frozen-backbone study: its
    input size, classifier[0] folded where exact); what search.costs counts too."""
    return {"input_size": input_size, "fold": True} if spec.feature_head else {}


def _mlp_stat(value, channels: int) -> float | tuple[float, ...]:
    """A statistic as the MLP's normalization takes it: one float for every channel (scalar
    buffers, as saved since mlp-v1, for grayscale), or one per channel (colour)."""
    values = (float(value),) if isinstance(value, int | float) else tuple(
        float(v) for v in value)
    if len(values) == 1:
        return values[0]
    if len(values) != channels:
        raise ValueError(f"{channels} channel(s), but statistics for {len(values)}: {value}")
    return values


def build_mlp(params: mlp_space.MLPParams, image_shape, n_classes: int, mean, std,
              **_context) -> Built:
    pair = PAIRS[params.pair]
    channels, height, width = image_shape
    model = MLP(
        channels * height * width, params.widths, n_classes,
        activation=pair.activation, dropout=params.dropout,
        dropout_rate=params.dropout_rate, output=pair.output,
        mean=_mlp_stat(mean, channels), std=_mlp_stat(std, channels),
    )
    return Built(model, pair.make_loss(),
                 lambda m, fused=False: make_optimizer(params.optimizer, m, params.lr,
                                                       fused=fused),
                 lambda optimizer, steps: make_scheduler(params.schedule, optimizer, params.lr,
                                                         steps))


def build_cnn(params: cnn_space.CNNParams, image_shape, n_classes: int, mean, std,
              **_context) -> Built:
    pair = PAIRS[params.pair]
    channels = int(image_shape[0])
    if params.normalization == "lecture":
        mean, std = (LECTURE_MEAN,) * channels, (LECTURE_STD,) * channels
    elif isinstance(mean, int | float):
        mean, std = (float(mean),) * channels, (float(std),) * channels
    model = CNN(
        image_shape, params.channels, n_classes, kernel=params.kernel,
        padding=params.padding, batch_norm=params.batch_norm, pool=params.pool,
        pool_at=params.pool_at, dropout=params.dropout,
        conv_dropout_rate=params.conv_dropout_rate,
        head_dropout_rate=params.head_dropout_rate, head_width=params.head_width,
        activation=pair.activation, output=pair.output, mean=tuple(mean), std=tuple(std),
    )
    return Built(
        model, pair.make_loss(),
        lambda m, fused=False: make_optimizer(params.optimizer, m, params.lr, fused=fused),
        lambda optimizer, steps: make_scheduler(params.schedule, optimizer, params.lr, steps),
        params.augment,
    )


def _vgg16_training(params: vgg16_space.VGGParams, model: nn.Module) -> Built:
    return Built(model, nn.CrossEntropyLoss(label_smoothing=params.label_smoothing),
                 lambda m, fused=False: make_optimizer(params.optimizer, m, params.lr,
                                                       params.weight_decay, fused))


def build_vgg16(params: vgg16_space.VGGParams, image_shape, n_classes: int, mean, std, *,
                weights_state: dict | None = None, input_size: int = 32, fold: bool = False,
                **_context) -> Built:
    """The whole network (saved, reloaded, exported). `mean`/`std` are not used: VGG16
    normalizes with ImageNet's statistics (search.models.vgg16). `fold`: classifier[0]
    folded where that is exact (FrozenVGG16)."""
    return _vgg16_training(params, FrozenVGG16(
        n_classes, head=params.head, input_size=input_size, hidden=params.hidden,
        dropout=params.dropout, state=weights_state, fold=fold))


def build_vgg16_head(params: vgg16_space.VGGParams, n_features: int, n_classes: int) -> Built:
    """The head alone, trained on cached features by trials and the final retrain."""
    return _vgg16_training(params, make_head(params.head, n_features, n_classes,
                                             params.hidden, params.dropout))


def _study(space, name: str, description: str, build: Callable[..., Built],
           default_epochs: int, **extra) -> StudySpec:
    """A registry row from a spaces/ module (VERSION, suggest, to_trial_params, describe,
    REFERENCES) and the builder of its models."""
    return StudySpec(
        name=name, description=description, space_version=space.VERSION,
        suggest=space.suggest, to_trial_params=space.to_trial_params, build=build,
        describe=space.describe, default_data="auto", default_epochs=default_epochs,
        references=MappingProxyType(dict(space.REFERENCES)), **extra,
    )


# mnist-5k (25 steps per epoch) keeps its 20 epochs; 54,000 images (422 steps) get 10: on
# MNIST's 54,000 training images 10 epochs per trial ended higher than 6 within the same
# 150 s search, on two days (benchmarks/RESULTS.md "Defaults": 0.9857 against 0.9837,
# 0.9842 against 0.9823)
STEPS_PER_MLP_TRIAL = 4_200
# mnist-5k (25 steps per epoch) keeps its 8 epochs; 54,000 images (422 steps) get 3. On a
# 2-core CPU an epoch of Fashion-MNIST's 54,000 images costs a lecture-sized net 80-140 s
# per worker, so 8 epochs per trial left an hour's search 2 complete trials, and the final
# retrain (twice a trial's epochs) half the hour; a batch-normalized pooled net reaches
# 0.9175 validation in 3 epochs there, above the lecture CNN's 3 (benchmarks/RESULTS.md,
# "Defaults")
STEPS_PER_CNN_TRIAL = 1_200

STUDIES: Mapping[str, StudySpec] = MappingProxyType({
    "mlp": _study(mlp_space, "mlp", "MNIST MLP: hidden-layer widths array, dropout placement "
                  "and rate, activation/loss pair, optimizer and learning rate",
                  build_mlp, default_epochs=20, steps_per_trial=STEPS_PER_MLP_TRIAL,
                  workers_per_gpu=4, default_references="skip"),
    # a CNN epoch costs ~10x an MLP's on a CPU, and pruning cuts the rest. The reference
    # nets stay out of the search (the final step retrains them): run in full they took
    # most of a short search (mnist-5k, 100 s: 3 trials against 12; benchmarks/RESULTS.md)
    "cnn": _study(cnn_space, "cnn", "CNN: conv channels array, kernel, batch norm, pooling, "
                  "dropout, head, activation/loss pair, optimizer, lr schedule, "
                  "albumentations strength", build_cnn, default_epochs=8,
                  steps_per_trial=STEPS_PER_CNN_TRIAL, augments=True, workers_per_gpu=2,
                  default_references="skip"),
    # a head on cached features trains in well under a second per epoch
    "vgg16": _study(vgg16_space, "vgg16", "frozen torchvision VGG16 (--weights): the "
                    "exercise's replaced classifier[6] or a small new head, optimizer, lr, "
                    "weight decay, label smoothing", build_vgg16, default_epochs=10,
                    workers_per_gpu=2,
                    feature_head=lambda params: params.head, build_head=build_vgg16_head),
})


def get(name: str) -> StudySpec:
    """Raises ConfigError listing the valid names when `name` is not a study."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown study {name!r}; valid studies: {', '.join(sorted(STUDIES))}"
        ) from None
