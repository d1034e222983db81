"""The MLP of `python -m search.run --study mlp`: hidden-layer widths given as an array."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from search.models.common import ACTIVATIONS, Normalize, check_choice, head_output

# Where dropout goes in an MLP. Names are stored in studies: never rename one.
DROPOUT_PLACEMENTS = ("none", "input", "hidden", "both")


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
        mean: float | Sequence[float] = 0.0,  # per channel for colour images
        std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__()
        if len(widths) == 0 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty array of positive ints, got {widths}")
        check_choice("dropout placement", dropout, DROPOUT_PLACEMENTS)
        check_choice("activation", activation, ACTIVATIONS)
        ending = head_output(output)
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
        self.net = nn.Sequential(*layers, *ending)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
