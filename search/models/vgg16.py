"""torchvision's VGG16 with a frozen backbone and a trained head (the vgg16 study).

`resolve_weights("imagenet" | "none" | PATH)` finds the backbone's weights and fails in one
line when it cannot: never a silent fallback to random features, which would make every
conclusion about transfer learning false. `FrozenVGG16` takes images like every model here
(float [N, C, H, W] in [0, 1]); it repeats grayscale to 3 channels, resizes to the input size
and normalizes with ImageNet's mean and std, which is what the pretrained filters expect (the
training split's own statistics would shift every input away from what they were trained
on). Every backbone parameter has requires_grad=False and the backbone always runs in eval
mode, so its outputs for an image never change: they can be computed once and cached
(`features`), and a trial trains only `head`.

Heads: "exercise" is the course's: the whole network unchanged except classifier[6], replaced
by a Linear to the data set's classes, trained on the 4096-wide output of the frozen
classifier[:6]. "small" is a new head (hidden units, dropout) on the conv features, which at
32-63 px input are 512 x 1 x 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from search.cache import sha256_of
from search.errors import ConfigError
from search.models.common import read_state_dict

HEADS = ("exercise", "small")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_INPUT = 32  # VGG16 halves the map five times: below 32 px nothing is left


class WeightsError(ConfigError):
    """The VGG16 weights asked for cannot be found, downloaded or read; says what to do."""


@dataclass(frozen=True)
class VGGWeights:
    kind: str  # "imagenet", "none" (seeded random init) or "path"
    source: str  # the file, or how the random weights were made
    sha256: str  # of the file, or of the random state's tensors
    state: dict  # the VGG16 state_dict (CPU tensors)

    def describe(self) -> dict:
        """What model.json and the study record about the weights."""
        return {"kind": self.kind, "source": self.source, "sha256": self.sha256}


def _vgg16() -> nn.Module:
    from torchvision.models import vgg16

    return vgg16(weights=None)


def imagenet_file() -> tuple[Path, str]:
    """Where torchvision keeps VGG16_Weights.IMAGENET1K_V1 ($TORCH_HOME/hub/checkpoints/...)
    and the address it downloads it from."""
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def _download(url: str, path: Path) -> str:
    """Download `url` to `path` with torchvision's hash check; returns why it failed, or ''."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stderr(io.StringIO()):
            torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.split("-")[-1],
                                           progress=False)
    except Exception as exc:  # any network or disk failure means: not available
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {first}"
    return ""


def resolve_weights(spec: str, seed: int = 0) -> VGGWeights:
    """The backbone weights for --weights `spec`: "imagenet" (torchvision's IMAGENET1K_V1,
    from its cache or downloaded), "none" (random init seeded by `seed`) or a PATH to a
    VGG16 state_dict. Raises WeightsError in one line saying what to do instead."""
    if spec == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = _vgg16().state_dict()
        return VGGWeights("none", f"random initialization (torchvision's), seed {seed}",
                          _state_sha256(state), state)
    if spec == "imagenet":
        path, url = imagenet_file()
        if not path.is_file():
            reason = _download(url, path)
            if reason:
                raise WeightsError(
                    f"VGG16 ImageNet weights not found at {path} and not downloadable "
                    f"({reason}); put {path.name} from {url} there (or set $TORCH_HOME), or "
                    "pass --weights PATH to a VGG16 state_dict, or --weights none for random "
                    "features")
        return VGGWeights("imagenet", str(path), sha256_of(path), _read_state(path))
    path = Path(spec)
    if not path.is_file():
        raise WeightsError(f"--weights {spec}: no such file; give imagenet, none or the path "
                           "of a VGG16 state_dict")
    return VGGWeights("path", str(path), sha256_of(path), _read_state(path))


def _read_state(path: Path) -> dict:
    """A VGG16 state_dict from `path`, loaded with weights_only=True. Raises WeightsError."""
    try:
        state = read_state_dict(path)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    expected = {k: v.shape for k, v in _vgg16().state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:4])}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
            f"wrong shape {', '.join(wrong[:4])}" if wrong else "") if part)
        raise WeightsError(f"{path}: not a VGG16 state_dict ({detail})")
    return state


def _state_sha256(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


class ImageNetInput(nn.Module):
    """[N, 1 or 3, H, W] in [0, 1] -> [N, 3, size, size], normalized with ImageNet's mean and
    std (buffers, so a saved model carries them)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < MIN_INPUT:
            raise ValueError(f"VGG16 input size must be at least {MIN_INPUT}, got {size}")
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1))

    RESIZE = {"mode": "bilinear", "align_corners": False}

    @classmethod
    def describe(cls) -> dict:
        """What it does to an image besides the size (a cache key of its outputs)."""
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "gray": "repeated to 3 channels",
                **cls.RESIZE}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), **self.RESIZE)
        return (x - self.mean) / self.std


def feature_width(head: str, input_size: int) -> int:
    """Width of what the frozen part hands the head: the classifier's 4096, or the conv
    output (512 channels on a map of input_size / 32, five 2x2 max pools)."""
    return 4096 if head == "exercise" else 512 * (input_size // 32) ** 2


POOLED = 7  # VGG16's avgpool output side: 512 x 7 x 7 = 25088 inputs to classifier[0]


def foldable(input_size: int) -> bool:
    """Whether the conv stack ends in a 1 x 1 map at this input size (32-63 px)."""
    return input_size // 32 == 1


def fold_first_linear(linear: nn.Linear) -> nn.Linear:
    """classifier[0] (25088 -> 4096) for a 1 x 1 conv map, as a 512 -> 4096 Linear. The
    adaptive avgpool repeats each channel's single value over its 7 x 7 cells, and Flatten
    orders its 25088 inputs channel-major (channel * 49 + cell), so the 49 columns of each
    channel act on one value: their sum is that channel's column, exactly in real numbers
    (float sums in another order: equal to rounding)."""
    cells = POOLED * POOLED
    folded = nn.Linear(linear.in_features // cells, linear.out_features)
    with torch.no_grad():
        folded.weight.copy_(linear.weight.view(linear.out_features, -1, cells).sum(-1))
        folded.bias.copy_(linear.bias)
    return folded


def make_head(head: str, in_features: int, n_classes: int, hidden: int = 256,
              dropout: float = 0.0) -> nn.Module:
    """The trained part: a Linear for the exercise head, Linear-ReLU-Dropout-Linear for the
    small one. Trials build it alone and train it on cached features; its state_dict loads
    into FrozenVGG16.head."""
    if head == "exercise":
        return nn.Linear(in_features, n_classes)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, n_classes))


class FrozenVGG16(nn.Module):
    """VGG16 with every backbone parameter frozen; only `head` trains (see the module doc).

    `state` is a VGG16 state_dict (VGGWeights.state); None leaves torchvision's random
    initialization (a state_dict loaded afterwards, as load_model does, replaces it).
    Raises ValueError on an unknown head or an input size below 32.

    `fold`: at an input under 64 px with the exercise head, hold classifier[0] folded to
    512 -> 4096 (fold_first_linear): the same outputs to float rounding, 102.8 M fewer
    parameters (model.pt about 135 MB instead of 537 MB). The final step saves models
    folded; a model.json without the option loads unfolded.
    """

    def __init__(self, n_classes: int, *, head: str = "exercise", input_size: int = 32,
                 hidden: int = 256, dropout: float = 0.0, state: dict | None = None,
                 fold: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r} not in {HEADS}")
        vgg = _vgg16()
        if state is not None:
            vgg.load_state_dict(state)
        self.input = ImageNetInput(input_size)
        self.head_kind = head
        self.folded = bool(fold) and head == "exercise" and foldable(input_size)
        if self.folded:
            # the same function with classifier[0] 512 -> 4096 (see fold_first_linear)
            self.frozen = nn.Sequential(vgg.features, nn.Flatten(),
                                        fold_first_linear(vgg.classifier[0]),
                                        *vgg.classifier[1:6])
        elif head == "exercise":
            # the network unchanged but for its last Linear
            self.frozen = nn.Sequential(vgg.features, vgg.avgpool, nn.Flatten(),
                                        *vgg.classifier[:6])
        else:
            self.frozen = nn.Sequential(vgg.features, nn.Flatten())
        self.head = make_head(head, feature_width(head, input_size), n_classes, hidden,
                              dropout)
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)
        self.frozen.eval()

    def train(self, mode: bool = True) -> FrozenVGG16:
        super().train(mode)
        self.frozen.eval()  # frozen means its dropout is off too: features never change
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the frozen part makes of images: the head's input, the thing to cache."""
        return self.frozen(self.input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

