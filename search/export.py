"""Saving, reloading and exporting a final model: runs/<study-name>/model.{pt,json,onnx}.

model.pt holds a state_dict only; model.json beside it holds everything needed to rebuild
the model without the study (study kind, params, input shape and normalization, classes,
metrics, versions) and the sha256 of model.pt. `load_model` checks the digest, loads with
torch.load(weights_only=True) (no pickled code runs) and rebuilds through the registry, the
same builder the search used. `python -m search.evaluate` is built on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn

from search import registry
from search.cache import sha256_of
from search.config import MAX_INPUT_SIZE
from search.errors import ConfigError
from search.models.common import read_state_dict
from search.train import eval_batch

log = logging.getLogger(__name__)

FORMAT = "optuna-search-model/1"
REQUIRED = ("format", "study", "params", "input", "classes", "sha256")
# ONNX Runtime and PyTorch order float operations differently; on [0, 1] inputs the outputs
# of these nets agree to ~1e-6. A gap above this means the export is wrong, not rounding.
ONNX_ATOL = 1e-4
MAX_SIDE = 4096  # pixels per side of a model's input
MAX_CLASSES = 100_000
MIN_INPUT_SIZE = 32  # vgg16's input_size option (VGG16 halves it five times)


class ModelFileError(ConfigError):
    """model.pt or model.json is missing, corrupted, unsafe or does not fit; names the file."""


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    info: dict  # the contents of model.json
    params: object  # the study's frozen params dataclass


def save_model(model: nn.Module, directory: Path, info: dict) -> tuple[Path, Path]:
    """Write model.pt (state_dict) and model.json (`info` + format + sha256) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    weights, meta = directory / "model.pt", directory / "model.json"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    info = {"format": FORMAT, **info, "sha256": sha256_of(weights)}
    meta.write_text(json.dumps(info, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return weights, meta


def _read_info(meta: Path) -> dict:
    if not meta.is_file():
        raise ModelFileError(f"{meta}: missing; a model.pt is loaded with the model.json "
                             "written beside it")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{meta}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ModelFileError(f"{meta}: expected a JSON object")
    missing = [key for key in REQUIRED if key not in info]
    if missing:
        raise ModelFileError(f"{meta}: missing {', '.join(missing)}")
    if info["format"] != FORMAT:
        raise ModelFileError(f"{meta}: format {info['format']!r}, this version reads {FORMAT!r}")
    # checked before anything is built from them: a forged size must not allocate gigabytes
    shape = info["input"].get("shape") if isinstance(info["input"], dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] in (1, 3) and all(
            type(d) is int and 1 <= d <= MAX_SIDE for d in shape[1:])):
        raise ModelFileError(f"{meta}: input shape {str(shape)[:60]} is not [1 or 3 channels, "
                             f"height, width] of at most {MAX_SIDE} pixels")
    if not (isinstance(info["classes"], list) and 2 <= len(info["classes"]) <= MAX_CLASSES):
        raise ModelFileError(f"{meta}: classes must be a list of 2 to {MAX_CLASSES} names")
    options = info.get("options", {})
    size = options.get("input_size", MIN_INPUT_SIZE) if isinstance(options, dict) else None
    if not (isinstance(options, dict) and set(options) <= {"input_size", "fold"}
            and type(size) is int and MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE
            and type(options.get("fold", False)) is bool):
        raise ModelFileError(f"{meta}: options {str(options)[:60]} are not an input_size from "
                             f"{MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} and a fold flag")
    if not isinstance(info["params"], dict):
        raise ModelFileError(f"{meta}: params must be a JSON object")
    return info


class _WithinSpace(optuna.trial.FixedTrial):
    """The stored params, each checked against the distribution its space suggests it from
    (FixedTrial only warns about a value outside it, e.g. a width of 2e9). Raises
    ValueError on a missing param or one outside its distribution."""

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self._given = dict(params)

    def _given_value(self, name: str):
        if name not in self._given:
            raise ValueError(f"param {name!r} is missing")
        return self._given[name]

    def suggest_float(self, name, low, high, *, step=None, log=False):
        value = self._given_value(name)
        if type(value) not in (int, float) or not (low <= value <= high):
            raise ValueError(f"param {name}={repr(value)[:40]} is not a number from {low} to "
                             f"{high}")
        return super().suggest_float(name, low, high, step=step, log=log)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        value = self._given_value(name)
        if type(value) is not int or not (low <= value <= high):
            raise ValueError(f"param {name}={repr(value)[:40]} is not an integer from {low} to "
                             f"{high}")
        return super().suggest_int(name, low, high, step=step, log=log)

    def suggest_categorical(self, name, choices):
        value = self._given_value(name)
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ValueError(f"param {name}={repr(value)[:40]} is not one of {list(choices)}")
        return super().suggest_categorical(name, choices)


def _fits_file(spec: registry.StudySpec, params, info: dict, state: dict, weights: Path,
               meta: Path) -> None:
    """Raises ModelFileError unless the model that `info` describes has exactly the tensors
    (names and shapes) of `state`, which model.pt holds: checked on the meta device, where
    building allocates nothing, so params describing a model of any size cost no memory,
    and the real model is no larger than the file."""
    with torch.device("meta"):
        skeleton = spec.build(params, tuple(info["input"]["shape"]), len(info["classes"]),
                              info["input"]["mean"], info["input"]["std"],
                              **info.get("options", {})).model
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    held = {name: tuple(t.shape) for name, t in state.items()}
    if expected == held:
        return
    described = sum(math.prod(shape) for shape in expected.values())
    stored = sum(math.prod(shape) for shape in held.values())
    wrong = [f"{name} {list(held[name])} (expects {list(shape)})"
             for name, shape in expected.items() if name in held and held[name] != shape]
    missing = [name for name in expected if name not in held]
    extra = [name for name in held if name not in expected]
    detail = "; ".join(part for part in (
        f"missing {', '.join(missing[:3])}" if missing else "",
        f"unexpected {', '.join(extra[:3])}" if extra else "",
        f"shapes {', '.join(wrong[:3])}" if wrong else "") if part)
    raise ModelFileError(
        f"{weights} does not fit the architecture in {meta.name}: it describes "
        f"{described:,} numbers, model.pt holds {stored:,} ({detail[:300]})")


def load_model(path: str | Path, map_location: str = "cpu") -> LoadedModel:
    """Rebuild the model saved at `path` (model.pt, with model.json beside it) in eval mode.

    Raises ModelFileError naming the file when either file is missing or corrupted, the
    sha256 differs, model.pt holds anything but tensors, a param lies outside its study's
    space, the weights do not fit the architecture that model.json describes (checked
    before that architecture is allocated), or the model does not fit in memory.
    """
    weights = Path(path)
    if not weights.is_file():
        raise ModelFileError(f"{weights}: no such file")
    meta = weights.with_suffix(".json")
    info = _read_info(meta)
    digest = sha256_of(weights)
    if digest != info["sha256"]:
        raise ModelFileError(
            f"{weights}: sha256 {digest[:16]}... differs from {meta.name}'s "
            f"{str(info['sha256'])[:16]}...: the file is truncated, corrupted or from another run"
        )
    try:
        state = read_state_dict(weights, map_location)
    except ValueError as exc:
        raise ModelFileError(f"{weights}: {exc}") from None
    try:
        spec = registry.get(str(info["study"]))
    except ConfigError as exc:
        raise ModelFileError(f"{meta}: {exc}") from None
    try:
        params = spec.suggest(_WithinSpace(info["params"]))
        _fits_file(spec, params, info, state, weights, meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{meta}: params do not describe a {spec.name} model "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
    try:  # as large as model.pt's tensors (checked above); the machine may still lack it
        model = spec.build(params, tuple(info["input"]["shape"]), len(info["classes"]),
                           info["input"]["mean"], info["input"]["std"],
                           **info.get("options", {})).model
    except (RuntimeError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{weights}: the model does not fit in this machine's memory "
                             f"({first[:200]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise ModelFileError(
            f"{weights} does not fit the architecture in {meta.name}: {detail[:400]}"
        ) from None
    return LoadedModel(model.to(map_location).eval(), info, params)


EXPORTERS = ("dynamo", "torchscript")


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor,
                exporters: tuple[str, ...] = EXPORTERS) -> str:
    """Export `model` (eval mode, CPU) to ONNX with a dynamic batch axis; returns the exporter.

    `example` is a float batch scaled to [0, 1], shaped like the model's input. `exporters`:
    the ones to try in turn, of "dynamo" (torch.export-based, PyTorch's default) and
    "torchscript" (a twentieth of the time, deprecated in PyTorch).
    """
    model = model.cpu().eval()
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the exporter logs every optimization pass at INFO
        logger.setLevel(logging.WARNING)
    try:
        for index, exporter in enumerate(exporters):
            try:
                _EXPORT[exporter](model, path, example)
                return exporter
            except Exception as exc:  # noqa: BLE001 - any failure: the next exporter
                if index == len(exporters) - 1:
                    raise
                log.warning("%s ONNX export failed (%s); using the %s exporter", exporter,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                            exporters[index + 1])
        raise ValueError("no ONNX exporter given")
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def _export_dynamo(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    # it prints its progress
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["image"],
                          output_names=["scores"], dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})


def _export_torchscript(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=["image"],
                          output_names=["scores"], dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})


_EXPORT = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def check_onnx(path: Path, model: nn.Module, images: torch.Tensor) -> dict:
    """Run the ONNX file with onnxruntime on uint8 `images` and compare with PyTorch, batch
    by batch (search.train.eval_batch: memory bounded by the input size, not the number of
    images).

    Returns the comparison; raises ModelFileError when predictions differ or outputs differ
    by more than ONNX_ATOL.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # no arena or planned memory pattern: with them onnxruntime held 1.3 GB for a batch of
    # 341 VGG16 images at 64 px where 0.3 GB was in use (one check, speed beside the point)
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model = model.cpu().eval()
    step = eval_batch(model, images)
    max_diff, same = 0.0, True
    for start in range(0, len(images), step):
        x = images[start:start + step].float().div(255.0)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
        same = same and bool((got.argmax(1) == expected.argmax(1)).all())
    result = {"images": int(len(images)), "batch": step, "max_abs_diff": max_diff,
              "atol": ONNX_ATOL, "same_predictions": same,
              "onnxruntime": onnxruntime.__version__}
    if not same or max_diff > ONNX_ATOL:
        raise ModelFileError(f"{path}: onnxruntime disagrees with PyTorch on {len(images)} "
                             f"test images (max |diff| {max_diff:.2e}, same predictions: "
                             f"{same})")
    return result
