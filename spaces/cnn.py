"""Search space of `python -m search.run --study cnn`.

`suggest(trial)` only samples and returns a frozen CNNParams; `search.registry` builds the
model, its optimizer, learning-rate schedule and augmentation from it. Structural choices
(blocks and channels, kernel, padding, batch norm, pooling, dropout placement, head width,
activation/loss pair, normalization, augmentation families) are the scientific ones; rates
and the learning rate are nuisance. The two reference configs are enqueued as the first
trials of every new study. Parameter names and choice lists are stored in studies: bump
VERSION when you change them.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from search.augment import FAMILIES, LEVELS, AugmentSpec
from search.models import CNN_DROPOUT, PADDINGS, POOL_AT, POOLS

VERSION = "cnn-v2"

MAX_BLOCKS = 4
# Pooling only after the last block ("last", the lecture CNN's shape) is offered to nets of at
# most this many blocks; deeper ones pool after each. Three or four convolutions at full
# resolution cost 4-30x the lecture CNN per epoch on a CPU and were never the better net:
# on Fashion-MNIST's 54,000 images (one core each) they took 132, 176 and 627 s for a first
# epoch at 0.79-0.86 validation accuracy, against 6-39 s and 0.69-0.92 for pooled nets of
# the same depth (benchmarks/RESULTS.md, "End-to-end runs"). cnn-v1 offered it at any depth
MAX_BLOCKS_POOLED_LAST = 2
CHANNEL_RANGE = (8, 128)  # channels per conv block, log scale
KERNELS = (3, 5)
HEAD_RANGE = (32, 512)  # units of the head's hidden layer, log scale
CONV_DROPOUT_RANGE = (0.05, 0.5)
HEAD_DROPOUT_RANGE = (0.05, 0.6)
PAIRS = ("relu_ce", "leakyrelu_nll", "elu_ce_smooth", "gelu_margin")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_RANGES = {"adam": (1e-4, 1e-2), "adamw": (1e-4, 1e-2), "sgd": (1e-3, 3e-1)}
SCHEDULES = ("constant", "onecycle", "cosine")
# "train": the training split's own mean and std; "lecture": the fixed MNIST constants
# (0.1307, 0.3081) of PyTorch's example, whatever the data
NORMALIZATIONS = ("train", "lecture")
STRENGTH_STEP = LEVELS[1] - LEVELS[0]


@dataclass(frozen=True)
class CNNParams:
    channels: tuple[int, ...]  # one entry per conv block, passed to CNN(channels=...)
    kernel: int
    padding: str
    batch_norm: bool
    pool: str
    pool_at: str
    dropout: str  # placement, one of search.models.CNN_DROPOUT
    conv_dropout_rate: float  # 0.0 unless dropout is "conv" or "both"
    head_dropout_rate: float  # 0.0 unless dropout is "head" or "both"
    head_width: int
    pair: str  # activation/loss pair, a key of search.models.PAIRS
    optimizer: str
    lr: float
    schedule: str
    normalization: str
    augment: AugmentSpec


def suggest(trial: optuna.Trial) -> CNNParams:
    n_blocks = trial.suggest_int("n_blocks", 1, MAX_BLOCKS)
    channels = tuple(trial.suggest_int(f"channels_b{i}", *CHANNEL_RANGE, log=True)
                     for i in range(n_blocks))
    kernel = trial.suggest_categorical("kernel", KERNELS)
    padding = trial.suggest_categorical("padding", PADDINGS)
    batch_norm = trial.suggest_categorical("batch_norm", (False, True))
    pool = trial.suggest_categorical("pool", POOLS)
    pool_at = (trial.suggest_categorical("pool_at", POOL_AT)
               if n_blocks <= MAX_BLOCKS_POOLED_LAST else "each")
    dropout = trial.suggest_categorical("dropout", CNN_DROPOUT)
    conv_rate = head_rate = 0.0
    if dropout in ("conv", "both"):
        conv_rate = trial.suggest_float("conv_dropout_rate", *CONV_DROPOUT_RANGE)
    if dropout in ("head", "both"):
        head_rate = trial.suggest_float("head_dropout_rate", *HEAD_DROPOUT_RANGE)
    head_width = trial.suggest_int("head_width", *HEAD_RANGE, log=True)
    pair = trial.suggest_categorical("pair", PAIRS)
    optimizer = trial.suggest_categorical("optimizer", OPTIMIZERS)
    lr = trial.suggest_float(f"{optimizer}_lr", *LR_RANGES[optimizer], log=True)
    schedule = trial.suggest_categorical("schedule", SCHEDULES)
    normalization = trial.suggest_categorical("normalization", NORMALIZATIONS)
    strength = trial.suggest_float("aug_strength", LEVELS[0], LEVELS[-1], step=STRENGTH_STEP)
    families: tuple[str, ...] = ()
    if strength > 0:
        families = tuple(f for f in FAMILIES
                         if trial.suggest_categorical(f"aug_{f}", (False, True)))
    return CNNParams(channels, kernel, padding, batch_norm, pool, pool_at, dropout, conv_rate,
                     head_rate, head_width, pair, optimizer, lr, schedule, normalization,
                     AugmentSpec(strength, families))


def to_trial_params(params: CNNParams) -> dict:
    """The flat Optuna parameters that make `suggest` return `params` (for enqueue_trial)."""
    flat: dict = {"n_blocks": len(params.channels)}
    flat.update({f"channels_b{i}": c for i, c in enumerate(params.channels)})
    flat.update({"kernel": params.kernel, "padding": params.padding,
                 "batch_norm": params.batch_norm, "pool": params.pool,
                 "dropout": params.dropout})
    if len(params.channels) <= MAX_BLOCKS_POOLED_LAST:
        flat["pool_at"] = params.pool_at
    if params.dropout in ("conv", "both"):
        flat["conv_dropout_rate"] = params.conv_dropout_rate
    if params.dropout in ("head", "both"):
        flat["head_dropout_rate"] = params.head_dropout_rate
    flat.update({"head_width": params.head_width, "pair": params.pair,
                 "optimizer": params.optimizer, f"{params.optimizer}_lr": params.lr,
                 "schedule": params.schedule, "normalization": params.normalization,
                 "aug_strength": params.augment.strength})
    if params.augment.strength > 0:
        flat.update({f"aug_{f}": f in params.augment.families for f in FAMILIES})
    return flat


def describe(params: CNNParams) -> str:
    """One line for the report's comparison table."""
    dropout = {"none": "no dropout", "conv": f"dropout {params.conv_dropout_rate:.2g} (conv)",
               "head": f"dropout {params.head_dropout_rate:.2g} (head)",
               "both": f"dropout {params.conv_dropout_rate:.2g}/{params.head_dropout_rate:.2g}"
               }[params.dropout]
    return (f"conv {list(params.channels)} k{params.kernel} {params.padding}"
            f"{' +BN' if params.batch_norm else ''}, {params.pool} pool ({params.pool_at}), "
            f"head {params.head_width}, {dropout}, {params.pair}, {params.optimizer} "
            f"{params.schedule}, {params.normalization} normalization, augmentation "
            f"{params.augment.describe()}")


# PyTorch's classic MNIST example net (examples/mnist): two 3x3 convs with 32 and 64
# channels, no padding, one 2x2 max pool, dropout 0.25 then 0.5 around a 128-unit head,
# ReLU + cross-entropy, Adam (the example uses Adadelta at lr 1.0 with a step decay; Adam
# at 1e-3 is what the lecture trains with), the example's fixed MNIST normalization
# constants, no augmentation.
LECTURE = CNNParams((32, 64), 3, "valid", False, "max", "last", "both", 0.25, 0.5, 128,
                    "relu_ce", "adam", 1e-3, "constant", "lecture", AugmentSpec())
# The exercise: the same net, normalized with the training split's own statistics and
# trained on moderately augmented images (contrast, blur, small affine at strength 0.5).
EXERCISE = CNNParams((32, 64), 3, "valid", False, "max", "last", "both", 0.25, 0.5, 128,
                     "relu_ce", "adam", 1e-3, "constant", "train",
                     AugmentSpec(0.5, ("contrast", "blur", "affine")))
REFERENCES = {"lecture": LECTURE, "exercise": EXERCISE}
