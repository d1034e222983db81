"""The cnn study end to end on tiny data: search, final retrain, reload, ONNX, report, and
the mlp study's result beside it when the storage holds one on the same data."""

from __future__ import annotations

import json
import re

import optuna
import pytest

from search import augment
from search import evaluate as evaluate_module
from search import final as final_module
from search.config import RunConfig
from search.export import load_model
from search.run import search
from search.train import predict_scores
from tests.conftest import onnx_agrees


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    common = dict(data="digits", storage=f"sqlite:///{root / 'studies.db'}", final_seeds=1,
                  runs_dir=str(root / "runs"))
    mlp_cfg = RunConfig(study="mlp", n_trials=2, epochs=2, **common)
    mlp_study, opened, dataset = search(mlp_cfg)
    mlp_outcome = final_module.run_final(mlp_study, mlp_cfg, opened, dataset)
    # the reference nets in the search (the cnn default leaves them to the final step)
    cfg = RunConfig(study="cnn", n_trials=3, epochs=3, references="full", **common)
    study, opened, dataset = search(cfg)
    outcome = final_module.run_final(study, cfg, opened, dataset)
    return cfg, study, outcome, root, mlp_outcome


def test_references_run_first_and_record_their_augmentation(finished):
    _, study, _, _, _ = finished
    lecture, exercise = study.trials[:2]
    assert lecture.user_attrs["reference"] == "lecture"
    assert exercise.user_attrs["reference"] == "exercise"
    assert "augment_copies_seen" not in lecture.user_attrs  # the lecture CNN: no augmentation
    assert exercise.user_attrs["augment_copies_seen"] == min(3, augment.COPIES)
    assert exercise.user_attrs["augment_seconds"] >= 0
    assert lecture.params["normalization"] == "lecture" and exercise.params["aug_strength"] > 0


def test_augmented_copies_are_cached_beside_the_storage(finished):
    _, _, _, root, _ = finished
    cached = list((root / "studies-cache" / "augment").glob("*.npy"))
    digests = list((root / "studies-cache" / "augment").glob("*.sha256"))
    assert len(cached) == len(digests) >= min(3, augment.COPIES)


def test_final_files_reload_and_onnx(finished):
    _, _, outcome, root, _ = finished
    directory = root / "runs" / "cnn-digits"
    info = json.loads((directory / "model.json").read_text())
    assert info["study"] == "cnn" and info["space_version"] == "cnn-v2"
    # the training split's own statistics, computed here (population std over its pixels)
    pixels = outcome.dataset.train.x.double() / 255
    assert info["input"]["mean"] == pytest.approx([float(pixels.mean())], rel=1e-9)
    assert info["input"]["std"] == pytest.approx([float(pixels.std(unbiased=False))], rel=1e-9)
    loaded = load_model(directory / "model.pt")
    normalize = loaded.model.net[0]
    assert normalize.mean.flatten().tolist() == pytest.approx(info["input"]["applied"]["mean"])
    scores = predict_scores(loaded.model, outcome.dataset.test.x)
    accuracy = float((scores.argmax(1) == outcome.dataset.test.y).float().mean())
    assert accuracy == pytest.approx(outcome.test["accuracy"])
    onnx_agrees(directory / "model.onnx", loaded.model, outcome.dataset.test.x)
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics["comparison"]) == {"best found", "lecture net", "exercise net"}


def test_evaluate_prints_the_reports_accuracy(finished, capsys):
    _, _, _, root, _ = finished
    directory = root / "runs" / "cnn-digits"
    assert evaluate_module.main([str(directory / "model.pt")]) == 0
    printed = capsys.readouterr().out
    line = re.search(r"test accuracy [0-9.]+ \(\d+/\d+\), macro F1 [0-9.]+", printed).group(0)
    assert line in (directory / "report.md").read_text()


def test_report_shows_references_augmentation_and_the_mlp_beside_it(finished):
    _, _, outcome, root, mlp_outcome = finished
    md = (root / "runs" / "cnn-digits" / "report.md").read_text()
    comparison = md.split("## Reference configs and best found")[1].split("\n## ")[0]
    for label in ("best found", "lecture net", "exercise net"):
        assert f"| {label} |" in comparison
    assert "augmentation none" in comparison  # the lecture CNN, said so
    # what the exercise changed, and what that did to the test score
    step = re.search(r"\*\*From the lecture net to the exercise net\*\* \((.*)\): test "
                     r"accuracy [+-]\d+\.\d+ points", comparison)
    assert step and "normalization lecture → train" in step.group(1)
    assert "augment.strength 0 → 0.5" in step.group(1)
    others = md.split("## Other studies on the same data")[1].split("\n## ")[0]
    assert f"| mlp-digits | mlp | {mlp_outcome.test['accuracy']:.4f} |" in others
    assert f"| cnn-digits (this study) | cnn | {outcome.test['accuracy']:.4f} |" in others
    section = md.split("## Augmentation")[1].split("\n## ")[0]
    assert "Distinct augmented copies a trial saw" in section
    assert "figures/augment.png" in section
    assert (root / "runs" / "cnn-digits" / "figures" / "augment.png").is_file()
    assert "| class | precision | recall | F1 | support |" in md and "figures/confusion.png" in md


def test_dashboard_note_and_final_attribute(finished):
    cfg, study, outcome, _, _ = finished
    stored = optuna.load_study(study_name=study.study_name, storage=cfg.storage)
    final = stored.user_attrs["final"]
    assert final["test_accuracy"] == outcome.test["accuracy"]
    assert final["n_parameters"] == outcome.results["best found"].n_parameters
    assert "model.onnx" in final["artifacts"] and "figures/augment.png" in final["artifacts"]

