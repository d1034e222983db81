"""Search space of `python -m search.run --study vgg16`.

The backbone is torchvision's VGG16, frozen; only the head is searched. `suggest(trial)`
returns a frozen VGGParams; `search.registry` builds the head (trials train it on cached
backbone features) and the whole network (what is saved). The input size is not searched:
it is --input-size (default 32), so the backbone runs once per study. Bump VERSION when
names or choice lists change.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from search.models.vgg16 import HEADS

VERSION = "vgg16-v1"

HIDDEN_RANGE = (32, 1024)  # units of the small head's hidden layer, log scale
DROPOUT_RANGE = (0.0, 0.5)
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_RANGES = {"adam": (1e-4, 3e-2), "adamw": (1e-4, 3e-2), "sgd": (1e-3, 3e-1)}
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)  # log scale
SMOOTHING_RANGE = (0.0, 0.2)


@dataclass(frozen=True)
class VGGParams:
    head: str  # "exercise" (classifier[6] replaced) or "small" (a new head on conv features)
    hidden: int  # the small head's hidden units; 0 for the exercise head
    dropout: float  # the small head's dropout; 0.0 for the exercise head
    optimizer: str
    lr: float
    weight_decay: float
    label_smoothing: float


def suggest(trial: optuna.Trial) -> VGGParams:
    head = trial.suggest_categorical("head", HEADS)
    hidden, dropout = 0, 0.0
    if head == "small":
        hidden = trial.suggest_int("small_hidden", *HIDDEN_RANGE, log=True)
        dropout = trial.suggest_float("small_dropout", *DROPOUT_RANGE)
    optimizer = trial.suggest_categorical("optimizer", OPTIMIZERS)
    lr = trial.suggest_float(f"{optimizer}_lr", *LR_RANGES[optimizer], log=True)
    weight_decay = trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True)
    smoothing = trial.suggest_float("label_smoothing", *SMOOTHING_RANGE)
    return VGGParams(head, hidden, dropout, optimizer, lr, weight_decay, smoothing)


def to_trial_params(params: VGGParams) -> dict:
    """The flat Optuna parameters that make `suggest` return `params` (for enqueue_trial)."""
    flat: dict = {"head": params.head}
    if params.head == "small":
        flat.update({"small_hidden": params.hidden, "small_dropout": params.dropout})
    flat.update({"optimizer": params.optimizer, f"{params.optimizer}_lr": params.lr,
                 "weight_decay": params.weight_decay,
                 "label_smoothing": params.label_smoothing})
    return flat


def describe(params: VGGParams) -> str:
    """One line for the report's comparison table."""
    head = ("frozen VGG16, classifier[6] replaced (4096 -> classes)" if params.head == "exercise"
            else f"frozen VGG16 conv features -> {params.hidden} units, dropout "
                 f"{params.dropout:.2g} -> classes")
    return (f"{head}; {params.optimizer} lr {params.lr:.2g}, weight decay "
            f"{params.weight_decay:.1g}, label smoothing {params.label_smoothing:.2g}")


# The exercise: the pretrained network unchanged except its last Linear, trained with Adam
# at the usual 1e-3, (almost) no weight decay, no label smoothing.
EXERCISE = VGGParams("exercise", 0, 0.0, "adam", 1e-3, 1e-6, 0.0)
REFERENCES = {"exercise": EXERCISE}
