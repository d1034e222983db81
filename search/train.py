"""The trainer behind every trial and the final retrain (`python -m search.run`).

In-memory data sits on the device as one uint8 tensor; each epoch draws a seeded random
permutation and slices batches from it, converting to float only per batch. No DataLoader,
no per-sample Python: `benchmarks/epoch_throughput.py` measures what that buys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from search.errors import ConfigError, TrialDiverged

# An epoch-mean loss above this is treated as exploded: no loss here starts above ~10.
EXPLODED_LOSS = 1e4
EVAL_BATCH = 4096  # images per forward pass when scoring; no gradients are kept

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
}


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Raises ValueError on an optimizer name this service does not know."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present. Raises ConfigError when 'cuda' is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class DeviceSplit:
    """Images (uint8) and labels already on the training device."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def of(cls, split, device: torch.device) -> DeviceSplit:
        return cls(split.x.to(device), split.y.to(device))

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _batches(n: int, batch_size: int, generator: torch.Generator, device) -> Iterator:
    order = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: DeviceSplit,
    val: DeviceSplit,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train for `epochs`, scoring validation accuracy after each; returns the history.

    `on_epoch` sees each result and may raise (optuna.TrialPruned) to stop early.
    Raises TrialDiverged when the loss becomes non-finite or explodes.
    """
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochResult] = []
    n = len(train)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        total = torch.zeros((), device=train.x.device)
        for index in _batches(n, batch_size, generator, train.x.device):
            scores = model(train.x[index].float().div_(255.0))
            loss = loss_fn(scores, train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * index.numel()
        mean_loss = float(total) / n  # one device sync per epoch
        if not math.isfinite(mean_loss) or mean_loss > EXPLODED_LOSS:
            raise TrialDiverged(f"training loss became {mean_loss:.4g} in epoch {epoch}")
        accuracy = evaluate_accuracy(model, val)
        result = EpochResult(epoch, mean_loss, accuracy, time.perf_counter() - started)
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return history


@torch.inference_mode()
def predict_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Model outputs for uint8 images `x`, in eval mode, batched."""
    model.eval()
    batches = (x[i:i + EVAL_BATCH] for i in range(0, len(x), EVAL_BATCH))
    return torch.cat([model(batch.float().div_(255.0)) for batch in batches])


def evaluate_accuracy(model: nn.Module, split: DeviceSplit) -> float:
    predicted = predict_scores(model, split.x).argmax(dim=1)
    return float((predicted == split.y).float().mean())
