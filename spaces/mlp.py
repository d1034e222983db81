"""Search space of `python -m search.run --study mlp`.

`suggest(trial)` only samples and returns a frozen MLPParams; `search.registry` builds the
model from it. The two reference configs are enqueued as the first trials of every new
study. Parameter names and choice lists are stored in studies: changing them breaks resuming
an old study, so bump VERSION when you do.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from search.models import DROPOUT_PLACEMENTS

VERSION = "mlp-v1"

MAX_LAYERS = 4
WIDTH_RANGE = (16, 1024)  # units per hidden layer, sampled on a log scale
DROPOUT_RANGE = (0.05, 0.6)
PAIRS = ("relu_ce", "leakyrelu_nll", "elu_ce_smooth", "gelu_margin")
OPTIMIZERS = ("adam", "sgd")
# learning-rate range per optimizer: each is its own parameter (adam_lr is not sgd_lr)
LR_RANGES = {"adam": (1e-4, 1e-2), "sgd": (1e-3, 3e-1)}


@dataclass(frozen=True)
class MLPParams:
    widths: tuple[int, ...]  # one width per hidden layer, passed to MLP(widths=...)
    dropout: str  # placement, one of DROPOUT_PLACEMENTS
    dropout_rate: float  # 0.0 when dropout == "none"
    pair: str  # activation/loss pair, a key of search.models.PAIRS
    optimizer: str
    lr: float


def suggest(trial: optuna.Trial) -> MLPParams:
    n_layers = trial.suggest_int("n_layers", 1, MAX_LAYERS)
    widths = tuple(
        trial.suggest_int(f"n_units_l{i}", *WIDTH_RANGE, log=True) for i in range(n_layers)
    )
    dropout = trial.suggest_categorical("dropout", DROPOUT_PLACEMENTS)
    rate = 0.0
    if dropout != "none":
        rate = trial.suggest_float("dropout_rate", *DROPOUT_RANGE)
    pair = trial.suggest_categorical("pair", PAIRS)
    optimizer = trial.suggest_categorical("optimizer", OPTIMIZERS)
    lr = trial.suggest_float(f"{optimizer}_lr", *LR_RANGES[optimizer], log=True)
    return MLPParams(widths, dropout, rate, pair, optimizer, lr)


def to_trial_params(params: MLPParams) -> dict:
    """The flat Optuna parameters that make `suggest` return `params` (for enqueue_trial)."""
    flat: dict = {"n_layers": len(params.widths)}
    flat.update({f"n_units_l{i}": w for i, w in enumerate(params.widths)})
    flat["dropout"] = params.dropout
    if params.dropout != "none":
        flat["dropout_rate"] = params.dropout_rate
    flat.update({"pair": params.pair, "optimizer": params.optimizer,
                 f"{params.optimizer}_lr": params.lr})
    return flat


def describe(params: MLPParams) -> str:
    """One line for the report's comparison table."""
    dropout = ("no dropout" if params.dropout == "none"
               else f"dropout {params.dropout_rate:.2g} ({params.dropout})")
    return (f"hidden {list(params.widths)}, {dropout}, {params.pair}, {params.optimizer} "
            f"lr {params.lr:.2g}")


# The lecture's MNIST MLP: two hidden layers, no dropout, ReLU + cross-entropy.
LECTURE = MLPParams((512, 256), "none", 0.0, "relu_ce", "adam", 1e-3)
# The exercise's seed net: three hidden layers, dropout 0.3 before the first hidden layer,
# and an activation/loss pair other than the lecture's.
SEED = MLPParams((512, 256, 128), "input", 0.3, "leakyrelu_nll", "adam", 1e-3)
REFERENCES = {"lecture": LECTURE, "seed": SEED}
