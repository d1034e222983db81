"""What a configuration costs to deploy, known before it trains: parameters, multiply-adds per
image and the bytes of its weights, for the whole model that would be saved (a frozen
backbone included), and, where a search asks for it, its latency.

The model is built by the study's own builder on PyTorch's meta device, which gives every
tensor its shape and dtype but no memory and no arithmetic, and one image is passed through
it with hooks on the layers that do the work. So the counts are exact, deterministic and
the same on every machine, and a VGG16 costs no more to count than a small CNN.

Latency is a measurement, not a count: the model is built for real (random weights: the time
of a forward pass does not depend on their values) and timed at batch 1 and 64, the median of
repeated runs: exported to ONNX and run in ONNX Runtime on the CPU, as it would be deployed,
or in PyTorch on the trial's device (--latency-runtime). It says where it was measured, and
varies with the machine and with what else runs on it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch
from torch import nn

from search.config import cpu_name
from search.registry import StudySpec

# flag of search.run -> the Costs field it bounds; FLOPs are counted as multiply-adds, as
# torchvision's model tables and most papers count them
LIMITS = {"max_params": "params", "max_flops": "macs", "max_latency_ms": "latency_ms"}
# a trial's user attribute under deployment limits: how far over each it is (> 0: over).
# The sampler learns them through Trial.set_constraint (Optuna 5, every sampler reads them),
# or on older Optuna through TPE's constraints_func (constraint_values), deprecated in 5.0
CONSTRAINTS_ATTR = "constraints"
# --objectives cost name (search.config.COST_OBJECTIVES) -> the Costs field it minimizes
OBJECTIVE_FIELDS = {"params": "params", "flops": "macs", "latency": "latency_ms"}
PER_TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


@dataclass(frozen=True)
class Costs:
    params: int  # every parameter of the deployed model, frozen ones included
    trainable: int  # the parameters a trial trains
    macs: int  # multiply-adds of one image through the convolution and linear layers
    weight_bytes: int  # parameters and buffers of its state_dict, as saved
    # milliseconds per image at batch 1 and, per image, at batch 64, and where they were
    # measured (Latency.where); None unless the search asked for latency (--objectives
    # ...,latency or --max-latency-ms)
    latency_ms: float | None = None
    latency_64_ms: float | None = None
    latency_on: str | None = None

    def as_attrs(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def describe(self) -> str:
        trained = "" if self.trainable == self.params else f" ({self.trainable:,} trained)"
        timed = "" if self.latency_ms is None else (
            f", {self.latency_ms:.3g} ms per image at batch 1"
            + ("" if self.latency_64_ms is None else f", {self.latency_64_ms:.3g} at batch 64")
            + f" ({self.latency_on})")
        return (f"{self.params:,} parameters{trained}, {_short(self.macs)} multiply-adds per "
                f"image, {self.weight_bytes / 1e6:.3g} MB of weights{timed}")

    def with_latency(self, latency: Latency) -> Costs:
        return replace(self, latency_ms=latency.ms_per_image,
                       latency_64_ms=latency.batch_ms_per_image, latency_on=latency.where)

    def objective_values(self, objectives: tuple[str, ...]) -> tuple[float, ...]:
        """The values of the cost objectives `objectives` (OBJECTIVE_FIELDS keys)."""
        values = tuple(getattr(self, OBJECTIVE_FIELDS[name]) for name in objectives)
        if None in values:
            raise ValueError(f"latency was not measured for objectives {objectives}")
        return values

    def tell(self, trial: optuna.Trial, limits: dict[str, float | None]) -> list[float]:
        """Give `trial` its constraint values (violations) where Optuna takes them per trial,
        named by the limit; returns them."""
        values = self.violations(limits)
        if PER_TRIAL_CONSTRAINTS:
            named = [name for name, limit in limits.items() if limit is not None]
            for name, value in zip(named, values, strict=True):
                trial.set_constraint(name, value)
        return values

    def violations(self, limits: dict[str, float | None]) -> list[float]:
        """For each limit given (a LIMITS key -> the most allowed, None: no limit), how far
        over it this is, as a fraction of the limit: > 0 violates it, <= 0 is within it (what
        Optuna's constraints_func returns)."""
        return [getattr(self, LIMITS[name]) / limit - 1.0
                for name, limit in limits.items() if limit is not None]

    def over(self, limits: dict[str, float | None]) -> str | None:
        """Which limit this breaks, in words, or None."""
        for name, limit in limits.items():
            value = getattr(self, LIMITS[name])
            if limit is not None and value > limit:
                flag = limit_flag(name)
                if name == "max_latency_ms":
                    return (f"{value:.3g} ms per image over {flag} {limit:g} (measured on "
                            f"{self.latency_on})")
                return f"{value:,} {LIMITS[name]} over {flag} {limit:,}"
        return None


def limit_flag(name: str) -> str:
    """The search.run flag of a LIMITS key: max_latency_ms -> --max-latency-ms."""
    return "--" + name.replace("_", "-")


def _short(number: int) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.3g}{suffix}"
    return str(number)


def _macs(model: nn.Module, image_shape) -> int:
    total = 0

    def count(module, _inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] \
                * module.kernel_size[1]
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *image_shape), device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _build(spec: StudySpec, params, image_shape, n_classes: int, **options) -> nn.Module:
    """The model the study's builder makes, with placeholder normalization statistics (they
    change no count and no time)."""
    channels = int(image_shape[0])
    return spec.build(params, image_shape, n_classes, (0.5,) * channels, (0.25,) * channels,
                      **options).model


def measure(spec: StudySpec, params, image_shape, n_classes: int,
            timed_on: torch.device | None = None, runtime: str = "onnxruntime",
            **options) -> Costs:
    """The costs of the model `spec.build(params, ...)` makes for images of `image_shape`
    (C, H, W); `options` are the builder's (vgg16: input_size, fold). With `timed_on`, also
    its latency in `runtime` (measure_latency: ONNX Runtime on the CPU, or PyTorch on that
    device). Raises what the builder raises for params that do not fit the input."""
    with torch.device("meta"):
        model = _build(spec, params, image_shape, n_classes, **options)
    state = model.state_dict()
    counted = Costs(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=_macs(model, image_shape),
        weight_bytes=sum(t.numel() * t.element_size() for t in state.values()),
    )
    if timed_on is None:
        return counted
    return counted.with_latency(measure_latency(spec, params, image_shape, n_classes,
                                                timed_on, runtime, **options))


@dataclass(frozen=True)
class Latency:
    ms_per_image: float  # batch 1: the median of the timed runs
    batch_ms_per_image: float  # at batch LATENCY_BATCHES[1], per image: what a server sees
    where: str  # the runtime and the device (CPU model and threads, or GPU name)
    runs: int  # timed runs at batch 1


# batch 1 (latency) and 64 (throughput, per image)
LATENCY_BATCHES = (1, 64)
# a trial's timing, by batch: (warm-up runs, (at least, at most) timed runs, seconds after
# which no run starts once the least are done); about a second per trial for a small net
TRIAL_TIMING = {1: (2, (5, 50), 0.5), 64: (1, (3, 20), 0.5)}
# a saved model.onnx's timing (the final step, search.evaluate): longer, once per model
FILE_TIMING = {1: (1, (3, 20), 2.0), 64: (1, (3, 20), 2.0)}


def _median_ms(run, timing: tuple[int, tuple[int, int], float], per: int) -> tuple[float, int]:
    """Milliseconds per image of `run()`, which handles `per` images: the median of the
    timed runs of `timing` (TRIAL_TIMING's form), and how many there were."""
    warmup, (least, most), seconds = timing
    for _ in range(warmup):
        run()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < most and (len(times) < least
                                 or time.perf_counter() - began < seconds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000 / per, 4), len(times)


def device_name(device: torch.device) -> str:
    """Where a PyTorch latency was measured, in words."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    if device.type == "cpu":
        return f"{cpu_name()}, {_threads(torch.get_num_threads())}, PyTorch {torch.__version__}"
    return f"{device}, PyTorch {torch.__version__}"


def _threads(count: int) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(spec: StudySpec, params, image_shape, n_classes: int, device,
                    runtime: str = "onnxruntime", **options) -> Latency:
    """Milliseconds per image of `spec.build(params, ...)` at batch 1 and 64, the median of
    repeated runs after a warm-up (TRIAL_TIMING), in `runtime` (search.config.
    LATENCY_RUNTIMES): "onnxruntime", exported to ONNX and run in ONNX Runtime on this
    machine's CPU with PyTorch's thread count (a worker's share); "pytorch", in PyTorch on
    `device` (eval mode, no autograd). The model gets random weights (a forward pass takes as
    long whatever their values), drawn without touching the caller's random state."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        model = _build(spec, params, image_shape, n_classes, **options).eval()
        images = torch.rand((max(LATENCY_BATCHES), *image_shape))
    if runtime == "onnxruntime":
        return _onnx_runtime_latency(model, images)
    if runtime != "pytorch":
        raise ValueError(f"unknown latency runtime {runtime!r}")
    model = model.to(device)
    timed = {}
    with torch.inference_mode():
        for batch in LATENCY_BATCHES:
            x = images[:batch].to(device)

            def run(x=x) -> None:
                model(x)
                _synchronize(device)

            timed[batch] = _median_ms(run, TRIAL_TIMING[batch], batch)
    return Latency(timed[1][0], timed[LATENCY_BATCHES[1]][0], device_name(device), timed[1][1])


def _onnx_runtime_latency(model: nn.Module, images: torch.Tensor) -> Latency:
    """measure_latency's "onnxruntime": the model exported (the TorchScript exporter first:
    a twentieth of a second for a small net, where the torch.export one takes seconds) to a
    temporary file, timed in an ONNX Runtime session of PyTorch's thread count."""
    import tempfile

    import onnxruntime

    from search.export import export_onnx

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="search-latency-") as tmp:
        path = Path(tmp) / "model.onnx"
        # a batch of 2: the torch.export exporter would fix a batch of 1 in the graph
        export_onnx(model, path, images[:2], exporters=("torchscript", "dynamo"))
        session = _onnx_session(path, threads)
    timed = _onnx_timings(session, images.numpy(), TRIAL_TIMING)
    return Latency(timed[1][0], timed[LATENCY_BATCHES[1]][0],
                   f"ONNX Runtime {onnxruntime.__version__}, {cpu_name()}, {_threads(threads)}",
                   timed[1][1])


def _onnx_session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session of the file (loaded in full: the file may go after);
    threads None: its default, every core."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_timings(session, images, timing: dict) -> dict[int, tuple[float, int]]:
    """By batch of LATENCY_BATCHES: (ms per image, timed runs) of `session` on the first
    images of `images` (a float32 array)."""
    name = session.get_inputs()[0].name
    return {batch: _median_ms(lambda x=images[:batch]: session.run(None, {name: x}),
                              timing[batch], batch)
            for batch in LATENCY_BATCHES}


def constraint_values(trial) -> tuple[float, ...]:
    """Optuna's constraints_func: the trial's CONSTRAINTS_ATTR; a trial stopped before its
    costs were known (its params did not fit the input) counts as within the limits."""
    return tuple(trial.user_attrs.get(CONSTRAINTS_ATTR, (0.0,)))


def onnx_latency(path: Path, image_shape) -> dict:
    """Milliseconds per image of the ONNX model at `path` in ONNX Runtime on this machine's
    CPU (its default session: every core), at batch 1 and 64: the median of repeated runs
    after a warm-up (FILE_TIMING), on random pixels. Says on what CPU it was measured."""
    import numpy as np
    import onnxruntime

    images = np.random.default_rng(0).random((max(LATENCY_BATCHES), *image_shape),
                                             dtype=np.float32)
    result: dict = {"runtime": f"onnxruntime {onnxruntime.__version__}, CPU",
                    "cpu": cpu_name()}
    for batch, (ms, runs) in _onnx_timings(_onnx_session(path, None), images,
                                           FILE_TIMING).items():
        result[f"batch_{batch}_ms_per_image"] = ms
        result[f"batch_{batch}_runs"] = runs
    return result


def describe_latency(latency: dict) -> str:
    return (f"{latency['batch_1_ms_per_image']:.3g} ms per image at batch 1, "
            f"{latency['batch_64_ms_per_image']:.3g} ms at batch 64 ({latency['runtime']}, "
            f"{latency['cpu']})")
