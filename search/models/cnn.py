"""The CNN of `python -m search.run --study cnn`: conv-block channels given as an array.

A block is conv (k x k) -> [batch norm] -> activation -> [pooling]. Pooling is 2x2 max or
average pooling, or the block's conv itself with stride 2 ("stride"); it follows every
block ("each") or only the last ("last"), and stops once the feature map is 1 pixel wide.
"valid" padding pads nothing, except in a block whose input is smaller than the kernel,
which is padded as "same" would: so every point of the space fits every input size (8x8
digits included) instead of failing its trial.
The head is flatten -> [dropout] -> Linear(head_width) -> activation -> [dropout] ->
Linear(classes). With channels (32, 64), kernel 3, "valid" padding, max pooling after the
last block, dropout 0.25 / 0.5 and a 128-unit head this is PyTorch's classic MNIST example
net (the lecture CNN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from search.models.common import ACTIVATIONS, Normalize, check_choice, head_output

# Names are stored in studies: never rename one.
POOLS = ("max", "avg", "stride")
POOL_AT = ("each", "last")
PADDINGS = ("same", "valid")
CNN_DROPOUT = ("none", "conv", "head", "both")  # after the conv stack, in the head, both


class CNN(nn.Module):
    """Raises ValueError on an empty or non-positive channels array, an unknown choice or an
    even kernel."""

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        n_classes: int,
        *,
        kernel: int = 3,
        padding: str = "same",
        batch_norm: bool = False,
        pool: str = "max",
        pool_at: str = "each",
        dropout: str = "none",
        conv_dropout_rate: float = 0.0,
        head_dropout_rate: float = 0.0,
        head_width: int = 128,
        activation: str = "relu",
        output: str = "logits",
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
    ) -> None:
        super().__init__()
        if len(channels) == 0 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty array of positive ints, "
                             f"got {channels}")
        for kind, value, choices in (("pool", pool, POOLS), ("pool_at", pool_at, POOL_AT),
                                     ("padding", padding, PADDINGS),
                                     ("dropout placement", dropout, CNN_DROPOUT),
                                     ("activation", activation, ACTIVATIONS)):
            check_choice(kind, value, choices)
        if kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"the kernel must be odd (centred 'same' padding), got {kernel}")
        ending = head_output(output)
        self.channels = tuple(int(c) for c in channels)
        in_channels, height, width = (int(v) for v in image_shape)
        pad = kernel // 2 if padding == "same" else 0
        layers: list[nn.Module] = [Normalize(mean, std)]
        for i, out_channels in enumerate(self.channels):
            pools_here = (pool_at == "each" or i == len(self.channels) - 1) and min(
                height, width) >= 2
            stride = 2 if pools_here and pool == "stride" else 1
            # "valid" on a map smaller than the kernel would leave nothing: pad that block
            block_pad = kernel // 2 if min(height, width) < kernel else pad
            layers.append(nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                                    padding=block_pad, bias=not batch_norm))
            height, width = ((size + 2 * block_pad - kernel) // stride + 1
                             for size in (height, width))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(ACTIVATIONS[activation]())
            if pools_here and pool != "stride" and min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        layers.append(nn.Flatten())
        if dropout in ("conv", "both"):
            layers.append(nn.Dropout(conv_dropout_rate))
        layers += [nn.Linear(in_channels * height * width, head_width),
                   ACTIVATIONS[activation]()]
        if dropout in ("head", "both"):
            layers.append(nn.Dropout(head_dropout_rate))
        layers.append(nn.Linear(head_width, n_classes))
        self.feature_shape = (in_channels, height, width)  # what the conv stack hands the head
        self.net = nn.Sequential(*layers, *ending)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
