"""The studies `python -m search.run --study NAME` knows: one StudySpec each.

A spec ties a search space (spaces/*.py) to the builder that turns its params into a model,
loss and optimizer. The search and the final retrain both go through `spec.build`, so a
model rebuilt from stored params is the model that was scored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import optuna
from torch import nn

from search.errors import ConfigError
from search.models import MLP, PAIRS
from search.train import make_optimizer
from spaces import mlp as mlp_space


@dataclass(frozen=True)
class Built:
    """What one set of params trains: the model, its loss and its optimizer."""

    model: nn.Module
    loss_fn: nn.Module
    # called after the model is moved to its device, so the optimizer holds those tensors
    make_optimizer: Callable[[nn.Module], Any]


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    space_version: str
    suggest: Callable[[optuna.Trial], Any]
    to_trial_params: Callable[[Any], dict]
    # build(params, image_shape (C, H, W), n_classes, mean, std) -> Built
    build: Callable[..., Built]
    default_data: str
    references: Mapping[str, Any] = field(default_factory=dict)


def build_mlp(params: mlp_space.MLPParams, image_shape, n_classes: int,
              mean: float, std: float) -> Built:
    pair = PAIRS[params.pair]
    channels, height, width = image_shape
    model = MLP(
        channels * height * width, params.widths, n_classes,
        activation=pair.activation, dropout=params.dropout,
        dropout_rate=params.dropout_rate, output=pair.output, mean=mean, std=std,
    )
    return Built(model, pair.make_loss(),
                 lambda m: make_optimizer(params.optimizer, m, params.lr))


STUDIES: Mapping[str, StudySpec] = MappingProxyType({
    "mlp": StudySpec(
        name="mlp",
        description="MNIST MLP: hidden-layer widths array, dropout placement and rate, "
                    "activation/loss pair, optimizer and learning rate",
        space_version=mlp_space.VERSION,
        suggest=mlp_space.suggest,
        to_trial_params=mlp_space.to_trial_params,
        build=build_mlp,
        default_data="auto",
        references=MappingProxyType(dict(mlp_space.REFERENCES)),
    ),
})


def get(name: str) -> StudySpec:
    """Raises ConfigError listing the valid names when `name` is not a study."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown study {name!r}; valid studies: {', '.join(sorted(STUDIES))}"
        ) from None
