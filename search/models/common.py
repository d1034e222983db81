"""What every model family shares: activations, activation/loss pairs, input normalization.

Every model takes float images scaled to [0, 1], shaped [N, C, H, W], and normalizes them
itself with statistics held as buffers, so a saved state_dict carries its own preprocessing.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.01),
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
OUTPUTS = ("logits", "log_softmax")


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


class Normalize(nn.Module):
    """(x - mean) / std with the training split's statistics, saved in the state_dict.

    A float gives scalar buffers (the MLP's, as saved since mlp-v1); a sequence gives one
    value per channel, shaped [C, 1, 1] to broadcast over [N, C, H, W].
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        if isinstance(mean, Sequence) != isinstance(std, Sequence):
            raise ValueError("mean and std must both be floats or both per-channel sequences")
        if isinstance(mean, Sequence):
            if len(mean) != len(std) or not len(mean):
                raise ValueError(f"per-channel mean {mean} and std {std} differ in length")
            shape = (len(mean), 1, 1)
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))
        else:
            self.register_buffer("mean", torch.tensor(float(mean)))
            self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def check_choice(kind: str, value: str, choices) -> None:
    """Raises ValueError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"{kind} {value!r} not in {tuple(choices)}")


def head_output(output: str) -> list[nn.Module]:
    """The layers after the last Linear for an output kind ("logits" or "log_softmax")."""
    check_choice("output", output, OUTPUTS)
    return [nn.LogSoftmax(dim=1)] if output == "log_softmax" else []


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Parameters of `model`; by default trainable ones only (a frozen backbone does not
    count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def read_state_dict(path: Path, map_location: str = "cpu") -> dict:
    """A state_dict from `path`, loaded with torch.load(weights_only=True): no pickled code
    runs. Raises ValueError saying why not: pickled objects other than tensors (refused),
    bytes torch cannot read, or something that is not a dict of tensors."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        code = next((line for line in lines if "Unsupported global" in line), None)
        if code is not None:
            raise ValueError("refused: it holds pickled objects other than tensors, which "
                             f"could run code when loaded ({code[:200]})") from None
        raise ValueError(f"not a readable PyTorch file ({lines[-1][:200] if lines else ''})"
                         ) from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail in many ways inside torch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a readable PyTorch file ({first[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"holds a {type(state).__name__}, not a state_dict")
    return state
