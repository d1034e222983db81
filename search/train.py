"""The trainer behind every trial and the final retrain (`python -m search.run`).

In-memory data sits on the device as one uint8 tensor; each epoch draws a seeded random
permutation and slices batches from it, converting to float only per batch. No DataLoader,
no per-sample Python: `benchmarks/epoch_throughput.py` measures what that buys. An epoch may
train on other images of the same shape (augmented copies, `epoch_images`); validation
always scores the untouched split.

Speed settings (`Speed.of`): the optimizer's fused kernel on CPUs and CUDA; bf16 autocast on
CUDA and on a CPU with native bf16 (AMX / AVX512-BF16), plus cudnn benchmark on CUDA and
channels_last for convolutional models, which `benchmarks/train_speed.py` measured faster
here (the losses stay float32). Scoring (`predict_scores`) always runs in float32, so
reported accuracies match the ONNX export.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from search.errors import ConfigError, DeadlineReached, TrialDiverged

# An epoch-mean loss above this is treated as exploded: no loss here starts above ~10.
EXPLODED_LOSS = 1e4
EVAL_BATCH = 4096  # at most this many images per forward pass when scoring
# activation bytes one scoring pass may hold: the batch shrinks as the input grows (VGG16 at
# 224 px takes ~13 MB per image in its first layer alone), never with the number of images
EVAL_BYTES = 1 << 30

# (params, lr, weight decay or None, fused: True or None) -> optimizer
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd, fused: torch.optim.Adam(params, lr=lr, weight_decay=wd or 0.0,
                                                           fused=fused),
    "adamw": lambda params, lr, wd, fused: torch.optim.AdamW(
        params, lr=lr, weight_decay=1e-2 if wd is None else wd, fused=fused),
    "sgd": lambda params, lr, wd, fused: torch.optim.SGD(
        params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd or 0.0, fused=fused),
}


def make_optimizer(name: str, model: nn.Module, lr: float,
                   weight_decay: float | None = None, fused: bool = False
                   ) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters only (a frozen backbone's are left out);
    weight_decay None is each optimizer's default (AdamW 1e-2, else 0). `fused`: PyTorch's
    fused kernel, one pass over every parameter per step (CPU and CUDA); otherwise PyTorch's
    default implementation for the device. Raises ValueError on an optimizer name this
    service does not know."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    # fused=False would also turn off the multi-tensor (foreach) default on CUDA: None keeps it
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr,
                            weight_decay, True if fused else None)


def cuda_unusable(seen: int) -> str:
    """Why `seen` GPUs torch sees cannot be used, and what to do (one line)."""
    return (f"torch {torch.__version__} sees {seen} GPU(s) but cannot run CUDA "
            f"{torch.version.cuda} on them: the NVIDIA driver is missing or older than this "
            "build needs (nvidia-smi shows the driver's CUDA version); update the driver or "
            "install the torch build for it (docs/scaling.md)")


def use_device(device: str | torch.device) -> None:
    """Make `device` (cuda:N) this process's current CUDA device, so that nothing it makes
    without naming a device (cuDNN handles, a stray tensor, empty_cache) lands on GPU 0;
    nothing for the CPU or a bare "cuda"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cpu', 'cuda' and 'cuda:N' are taken as they are.
    Raises ConfigError for anything else (torch also names mps, xla, meta, ...: this
    service trains on CPUs and CUDA GPUs only) and for a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"(cpu|cuda)(?::(\d{1,3}))?", name)
    if match is None or (match[1] == "cpu" and match[2] not in (None, "0")):
        raise ConfigError(f"--device {name!r} is not a device this service trains on; use "
                          "auto, cpu, cuda or cuda:N")
    if match[1] == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 and torch.cuda.device_count() > 0:
            raise ConfigError(f"--device {name}: {cuda_unusable(torch.cuda.device_count())}")
        if count == 0:
            raise ConfigError(f"--device {name} was given but no CUDA GPU is visible; use "
                              "--device cpu")
        if match[2] is not None and int(match[2]) >= count:
            raise ConfigError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to "
                              f"cuda:{count - 1}")
    return torch.device(name)


@dataclass(frozen=True)
class Speed:
    """How a model trains fast on its device (see the module doc)."""

    channels_last: bool = False
    autocast: torch.dtype | None = None  # mixed-precision dtype of the forward pass
    fused: bool = False  # the optimizer's fused kernel (make_optimizer)

    @classmethod
    def of(cls, model: nn.Module, device: torch.device) -> Speed:
        convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input shape per trial
            # bf16 on the worker's own GPU where it is native (compute capability 8.0,
            # Ampere, and later); torch.cuda.is_bf16_supported() asks the current device
            # and says yes on older GPUs, which emulate it slowly. Below: float32 (fp16
            # would need a gradient scaler, and no GPU has measured it here yet)
            bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
            return cls(convolutional, torch.bfloat16 if bf16 else None, fused=True)
        if device.type == "cpu":
            # benchmarks/train_speed.py: with native bf16, every model family here trained
            # faster under bf16 autocast (MLPs too), and convolutions in channels_last
            bf16 = _cpu_bf16()
            return cls(convolutional and bf16, torch.bfloat16 if bf16 else None, fused=True)
        return cls()

    def describe(self) -> str:
        """One line, stored in each trial's `speed` user attribute; Speed.parse reads it."""
        parts = (["channels_last"] if self.channels_last else []) + (
            [_autocast_name(self.autocast)] if self.autocast else ["float32"]) + (
            ["fused optimizer"] if self.fused else [])
        return ", ".join(parts)

    @classmethod
    def parse(cls, text: str) -> Speed:
        """The Speed that `describe` wrote `text` for (a trial's stored `speed`; one made
        before fused optimizers reads as unfused). Raises ValueError on other text."""
        parts = {part.strip() for part in text.split(",")}
        autocast = {_autocast_name(dtype): dtype for dtype in (torch.bfloat16, torch.float16)}
        known = {"channels_last", "float32", "fused optimizer", *autocast}
        if not parts <= known:
            raise ValueError(f"not a speed setting: {text!r}")
        dtype = next((autocast[part] for part in parts if part in autocast), None)
        return cls("channels_last" in parts, dtype, "fused optimizer" in parts)


def _autocast_name(dtype: torch.dtype) -> str:
    """How describe() writes an autocast dtype, and parse() reads it back."""
    return f"{str(dtype).removeprefix('torch.')} autocast"


def _cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


SCHEDULES = ("constant", "onecycle", "cosine")


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, lr: float,
                   total_steps: int):
    """A per-batch learning-rate schedule over `total_steps`; None for "constant".
    Raises ValueError on an unknown name."""
    if name == "constant":
        return None
    if name == "onecycle":  # warm up to lr over 30% of the steps, then anneal
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=max(total_steps, 2))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    raise ValueError(f"unknown learning-rate schedule {name!r}; known: {SCHEDULES}")


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


def as_input(x: torch.Tensor) -> torch.Tensor:
    """What a model takes: uint8 pixels scaled to [0, 1] floats; stored features (float16)
    as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


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
    scheduler=None,
    epoch_images: Callable[[int], torch.Tensor] | None = None,
    speed: Speed | None = None,
    stop_at: float | None = None,
    patience: int | None = None,
) -> list[EpochResult]:
    """Train for `epochs`, scoring validation accuracy after each; returns the history.

    `patience` (early stopping): stop once that many epochs in a row have not raised the best
    validation accuracy so far; the history then ends at the last epoch trained.

    `on_epoch` sees each result and may raise (optuna.TrialPruned) to stop early.
    `stop_at` (a time.time() deadline) is checked after every batch: past it, DeadlineReached
    stops the training within one batch.
    `scheduler` is stepped after every batch. `epoch_images(epoch)` (1-based) gives the
    uint8 training images of that epoch on the device, shaped like `train.x`; the labels
    stay `train.y`. `speed` overrides Speed.of(model, device) (benchmarks compare them).
    Raises TrialDiverged when the loss becomes non-finite or explodes.
    """
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochResult] = []
    n = len(train)
    device = train.x.device
    speed = speed or Speed.of(model, device)
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    layout = torch.channels_last if speed.channels_last else torch.contiguous_format
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        images = train.x if epoch_images is None else epoch_images(epoch)
        model.train()
        total = torch.zeros((), device=device)
        for index in _batches(n, batch_size, generator, device):
            batch = as_input(images[index]).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=speed.autocast or torch.float32,
                                enabled=speed.autocast is not None):
                scores = model(batch)
            loss = loss_fn(scores.float(), train.y[index])  # the loss in float32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.detach() * index.numel()
            if stop_at is not None and time.time() >= stop_at:
                raise DeadlineReached(f"--timeout reached in epoch {epoch}")
        mean_loss = float(total) / n  # one device sync per epoch
        if not math.isfinite(mean_loss) or mean_loss > EXPLODED_LOSS:
            raise TrialDiverged(f"training loss became {mean_loss:.4g} in epoch {epoch}")
        accuracy = evaluate_accuracy(model, val)
        result = EpochResult(epoch, mean_loss, accuracy, time.perf_counter() - started)
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)
        if patience is not None and epoch - _best_epoch(history) >= patience:
            break
    return history


def _best_epoch(history: list[EpochResult]) -> int:
    """The first epoch with the highest validation accuracy of `history`."""
    return max(history, key=lambda r: (r.val_accuracy, -r.epoch)).epoch


def train_built(built, train: DeviceSplit, val: DeviceSplit, *, epochs: int, batch_size: int,
                seed: int, on_epoch: Callable[[EpochResult], None] | None = None,
                epoch_images: Callable[[int], torch.Tensor] | None = None,
                speed: Speed | None = None, stop_at: float | None = None,
                patience: int | None = None) -> list[EpochResult]:
    """fit() a `search.registry.Built` whose model is already on the device: makes its
    optimizer (fused when `speed` says so) and its schedule over every batch of `epochs`.
    `speed` None is Speed.of(model, device). Raises what fit() raises."""
    speed = speed or Speed.of(built.model, train.x.device)
    optimizer = built.make_optimizer(built.model, speed.fused)
    steps = epochs * math.ceil(len(train) / batch_size)
    return fit(built.model, built.loss_fn, optimizer, train, val, epochs=epochs,
               batch_size=batch_size, seed=seed, on_epoch=on_epoch,
               scheduler=built.make_scheduler(optimizer, steps), epoch_images=epoch_images,
               speed=speed, stop_at=stop_at, patience=patience)


_eval_batches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shape: n}


@torch.inference_mode()
def eval_batch(model: nn.Module, x: torch.Tensor) -> int:
    """Images per scoring pass of `model` (in eval mode) on inputs like `x`'s: EVAL_BYTES
    over what one image takes, three times its largest layer output (a layer's input, its
    output and a temporary; measured once per model and input shape on one image), at most
    EVAL_BATCH and at least 1."""
    known = _eval_batches.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    if key not in known:
        one = as_input(x[:1])
        largest = [one.numel() * one.element_size()]

        def measure(module, args, output) -> None:
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())

        hooks = [m.register_forward_hook(measure) for m in model.modules()
                 if next(m.children(), None) is None]
        try:
            model(one)
        finally:
            for hook in hooks:
                hook.remove()
        known[key] = int(max(1, min(EVAL_BATCH, EVAL_BYTES // (3 * largest[0]))))
    return known[key]


@torch.inference_mode()
def predict_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Model outputs for uint8 images (or stored features) `x`, in eval mode, in batches
    of eval_batch(model, x): memory bounded by the input size, not the number of images."""
    model.eval()
    if len(x) == 0:
        return model(as_input(x))
    step = eval_batch(model, x)
    return torch.cat([model(as_input(x[i:i + step])) for i in range(0, len(x), step)])


def evaluate_accuracy(model: nn.Module, split: DeviceSplit) -> float:
    predicted = predict_scores(model, split.x).argmax(dim=1)
    return float((predicted == split.y).float().mean())
