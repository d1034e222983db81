"""Model builders: the networks the studies search over, built from frozen params.

The search (`search.objective`) and the final retrain (`search.final`) build every model
through these functions, so a model rebuilt from stored params is the model that was scored.
Every model takes float images scaled to [0, 1], shaped [N, C, H, W], and normalizes them
itself with the training split's mean and std, held as buffers: a saved state_dict carries
its own preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.01),
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


@dataclass(frozen=True)
class Pair:
    """An activation and the loss it is trained with, plus what the model outputs for it."""

    activation: str
    output: str  # "logits" or "log_softmax": the last layer of the model
    make_loss: Callable[[], nn.Module]
    description: str


# Coherent activation/loss pairs. Names are stored in studies: never rename one.
PAIRS: dict[str, Pair] = {
    "relu_ce": Pair("relu", "logits", nn.CrossEntropyLoss, "ReLU + cross-entropy on logits"),
    "leakyrelu_nll": Pair(
        "leaky_relu", "log_softmax", nn.NLLLoss, "LeakyReLU + NLL on log-softmax"
    ),
    "elu_ce_smooth": Pair(
        "elu", "logits", lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
        "ELU + cross-entropy with label smoothing 0.1",
    ),
    "gelu_margin": Pair("gelu", "logits", nn.MultiMarginLoss, "GELU + multi-class margin loss"),
}

# Where dropout goes in an MLP. Names are stored in studies: never rename one.
DROPOUT_PLACEMENTS = ("none", "input", "hidden", "both")


class Normalize(nn.Module):
    """(x - mean) / std with the training split's statistics, saved in the state_dict."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """A fully connected classifier whose hidden-layer widths are given as an array.

    `dropout` places nn.Dropout(dropout_rate): "input" before the first hidden layer,
    "hidden" after every hidden layer, "both", or "none".
    Raises ValueError on an empty widths array, an unknown placement, activation or output.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        n_classes: int,
        activation: str = "relu",
        dropout: str = "none",
        dropout_rate: float = 0.0,
        output: str = "logits",
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        if len(widths) == 0 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty array of positive ints, got {widths}")
        if dropout not in DROPOUT_PLACEMENTS:
            raise ValueError(f"dropout placement {dropout!r} not in {DROPOUT_PLACEMENTS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} not in {sorted(ACTIVATIONS)}")
        if output not in ("logits", "log_softmax"):
            raise ValueError(f"output {output!r} must be 'logits' or 'log_softmax'")
        self.widths = tuple(int(w) for w in widths)
        layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
        if dropout in ("input", "both"):
            layers.append(nn.Dropout(dropout_rate))
        previous = in_features
        for width in self.widths:
            layers += [nn.Linear(previous, width), ACTIVATIONS[activation]()]
            if dropout in ("hidden", "both"):
                layers.append(nn.Dropout(dropout_rate))
            previous = width
        layers.append(nn.Linear(previous, n_classes))
        if output == "log_softmax":
            layers.append(nn.LogSoftmax(dim=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters only (a frozen VGG16 backbone does not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
