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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn

from search import registry
from search.cache import sha256_of
from search.errors import ConfigError
from search.models.common import read_state_dict

log = logging.getLogger(__name__)

FORMAT = "optuna-search-model/1"
REQUIRED = ("format", "study", "params", "input", "classes", "sha256")
# ONNX Runtime and PyTorch order float operations differently; on [0, 1] inputs the outputs
# of these nets agree to ~1e-6. A gap above this means the export is wrong, not rounding.
ONNX_ATOL = 1e-4
MAX_SIDE = 4096  # pixels per side of a model's input
MAX_CLASSES = 100_000


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
    return info


def load_model(path: str | Path, map_location: str = "cpu") -> LoadedModel:
    """Rebuild the model saved at `path` (model.pt, with model.json beside it) in eval mode.

    Raises ModelFileError naming the file when either file is missing or corrupted, the
    sha256 differs, model.pt holds anything but tensors, or the weights do not fit the
    architecture that model.json describes.
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
    spec = registry.get(info["study"])
    try:
        params = spec.suggest(optuna.trial.FixedTrial(info["params"]))
        built = spec.build(params, tuple(info["input"]["shape"]), len(info["classes"]),
                           info["input"]["mean"], info["input"]["std"],
                           **info.get("options", {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{meta}: params do not describe a {spec.name} model "
                             f"({type(exc).__name__}: {exc})") from None
    model = built.model
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise ModelFileError(
            f"{weights} does not fit the architecture in {meta.name}: {detail[:400]}"
        ) from None
    return LoadedModel(model.to(map_location).eval(), info, params)


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> str:
    """Export `model` (eval mode, CPU) to ONNX with a dynamic batch axis; returns the exporter.

    `example` is a float batch scaled to [0, 1], shaped like the model's input.
    """
    model = model.cpu().eval()
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the exporter logs every optimization pass at INFO
        logger.setLevel(logging.WARNING)
    try:
        return _export(model, path, example)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def _export(model: nn.Module, path: Path, example: torch.Tensor) -> str:
    try:
        # the torch.export-based exporter, PyTorch's default; it prints its progress
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["image"],
                              output_names=["scores"], dynamo=True, external_data=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - any failure: try the TorchScript exporter
        log.warning("torch.export-based ONNX export failed (%s); using the TorchScript "
                    "exporter", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=["image"],
                          output_names=["scores"], dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})
    return "torchscript"


def check_onnx(path: Path, model: nn.Module, images: torch.Tensor) -> dict:
    """Run the ONNX file with onnxruntime on uint8 `images` and compare with PyTorch.

    Returns the comparison; raises ModelFileError when predictions differ or outputs differ
    by more than ONNX_ATOL.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.float().div(255.0)
    with torch.inference_mode():
        expected = model.cpu().eval()(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    max_diff = float(np.abs(got - expected).max())
    same = bool((got.argmax(1) == expected.argmax(1)).all())
    result = {"images": int(len(x)), "max_abs_diff": max_diff, "atol": ONNX_ATOL,
              "same_predictions": same, "onnxruntime": onnxruntime.__version__}
    if not same or max_diff > ONNX_ATOL:
        raise ModelFileError(f"{path}: onnxruntime disagrees with PyTorch on {len(x)} test "
                             f"images (max |diff| {max_diff:.2e}, same predictions: {same})")
    return result
