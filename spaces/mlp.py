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

VERSION = "mlp-v2"

MAX_LAYERS = 4
# Ranges narrowed in mlp-v2 from 100 random trials of mlp-v1 on mnist-5k
# (benchmarks/RESULTS.md, "Defaults"): median validation accuracy 0.905 with a layer under
# 32 units (0.926 without), SGD below lr 0.01 best 0.925 (0.955 above), Adam below 3e-4 best
# 0.931 (0.954 above)
WIDTH_RANGE = (32, 1024)  # units per hidden layer, sampled on a log scale
DROPOUT_RANGE = (0.05, 0.6)
PAIRS = ("relu_ce", "leakyrelu_nll", "elu_ce_smooth", "gelu_margin")
OPTIMIZERS = ("adam", "sgd")
# learning-rate range per optimizer: each is its own parameter (adam_lr is not sgd_lr)
LR_RANGES = {"adam": (3e-4, 1e-2), "sgd": (1e-2, 3e-1)}
# per-batch learning-rate schedule over the trial's epochs (search.train.make_scheduler):
# cosine decay reached constant's accuracy in half the epochs on 54,000 MNIST images and
# lost ~0.5 points at 5-10 epochs on mnist-5k (benchmarks/mlp_schedule.py), so it is searched
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class MLPParams:
    widths: tuple[int, ...]  # one width per hidden layer, passed to MLP(widths=...)
    dropout: str  # placement, one of DROPOUT_PLACEMENTS
    dropout_rate: float  # 0.0 when dropout == "none"
    pair: str  # activation/loss pair, a key of search.models.PAIRS
    optimizer: str
    lr: float
    schedule: str = "constant"  # one of SCHEDULES


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
    schedule = trial.suggest_categorical("schedule", SCHEDULES)
    return MLPParams(widths, dropout, rate, pair, optimizer, lr, schedule)


def to_trial_params(params: MLPParams) -> dict:
    """The flat Optuna parameters that make `suggest` return `params` (for enqueue_trial)."""
    flat: dict = {"n_layers": len(params.widths)}
    flat.update({f"n_units_l{i}": w for i, w in enumerate(params.widths)})
    flat["dropout"] = params.dropout
    if params.dropout != "none":
        flat["dropout_rate"] = params.dropout_rate
    flat.update({"pair": params.pair, "optimizer": params.optimizer,
                 f"{params.optimizer}_lr": params.lr, "schedule": params.schedule})
    return flat


def describe(params: MLPParams) -> str:
    """One line for the report's comparison table."""
    dropout = ("no dropout" if params.dropout == "none"
               else f"dropout {params.dropout_rate:.2g} ({params.dropout})")
    schedule = "" if params.schedule == "constant" else f" ({params.schedule})"
    return (f"hidden {list(params.widths)}, {dropout}, {params.pair}, {params.optimizer} "
            f"lr {params.lr:.2g}{schedule}")


# The lecture's MNIST MLP: two hidden layers, no dropout, ReLU + cross-entropy.
LECTURE = MLPParams((512, 256), "none", 0.0, "relu_ce", "adam", 1e-3)
# The exercise's seed net: three hidden layers, dropout 0.3 before the first hidden layer,
# and an activation/loss pair other than the lecture's.
SEED = MLPParams((512, 256, 128), "input", 0.3, "leakyrelu_nll", "adam", 1e-3)
REFERENCES = {"lecture": LECTURE, "seed": SEED}
