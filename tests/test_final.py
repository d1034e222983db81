"""The final step on a real (tiny) study: files, reload, evaluate, ONNX, report, dashboard."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import optuna
import pytest
import torch

import storage
from search import evaluate as evaluate_module
from search import final as final_module
from search.config import RunConfig, final_training
from search.errors import ConfigError
from search.export import ModelFileError, check_onnx, load_model, sha256_of
from search.run import search
from search.train import predict_scores
from tests.conftest import onnx_agrees, wsgi_get

FILES = ("model.pt", "model.json", "model.onnx", "metrics.json", "report.md", "report.html")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One searched + finalized study on sklearn's digits, shared by this module's tests."""
    root = tmp_path_factory.mktemp("final")
    cfg = RunConfig(study="mlp", data="digits", n_trials=5, epochs=4,
                    storage=f"sqlite:///{root / 'studies.db'}", final_seeds=2,
                    runs_dir=str(root / "runs"))
    study, opened, _ = search(cfg)  # run_final loads the data again, as search.final does
    outcome = final_module.run_final(study, cfg, opened)
    return cfg, study, outcome, root / "runs" / "mlp-digits"


def test_all_files_are_written(finished):
    _, _, _, directory = finished
    for name in FILES:
        assert (directory / name).is_file(), name
    info = json.loads((directory / "model.json").read_text())
    assert info["sha256"] == sha256_of(directory / "model.pt")
    assert info["study"] == "mlp" and info["data"]["dataset"] == "digits"
    assert info["input"]["shape"] == [1, 8, 8] and len(info["classes"]) == 10
    assert 0 < info["input"]["mean"][0] < 1 and "torch" in info["versions"]
    assert info["input"]["applied"]["mean"] == pytest.approx(info["input"]["mean"])
    assert set(info["metrics"]) >= {"test_accuracy", "macro_f1", "val_accuracy"}
    # a state_dict only: it loads with weights_only=True into plain tensors
    state = torch.load(directory / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_reloaded_model_predicts_like_the_trained_one(finished):
    _, _, outcome, directory = finished
    spec, dataset = outcome.spec, outcome.dataset
    # the config best on validation: the best found, or a reference net that beat it
    run = outcome.results[outcome.saved].best_run()
    built = spec.build(outcome.results[outcome.saved].params, dataset.image_shape, 10,
                       dataset.mean, dataset.std)
    built.model.load_state_dict(run.state)
    reloaded = load_model(directory / "model.pt")
    assert reloaded.model is not built.model
    a = predict_scores(built.model, dataset.test.x)
    b = predict_scores(reloaded.model, dataset.test.x)
    assert torch.equal(a.argmax(1), b.argmax(1)) and torch.allclose(a, b)
    accuracy = float((b.argmax(1) == dataset.test.y).float().mean())
    assert accuracy == pytest.approx(outcome.test["accuracy"])


def test_best_seed_is_chosen_on_validation_not_test(finished):
    from search.retrain import ConfigResult, SeedRun

    # validation and test rank the seeds in opposite orders
    runs = [SeedRun(seed, [], 1, val, {}, {"accuracy": test})
            for seed, val, test in ((0, 0.90, 0.99), (1, 0.95, 0.91), (2, 0.93, 0.97))]
    assert ConfigResult("x", None, 1, runs).best_run().seed == 1
    _, _, outcome, directory = finished
    saved = json.loads((directory / "model.json").read_text())["training"]
    assert saved["seed"] == outcome.results["best found"].best_run().seed
    assert sorted(saved["seeds"]) == sorted(r.seed for r in outcome.results["best found"].runs)


def test_final_retrains_train_longer_than_trials_and_stop_early(finished):
    cfg, _, outcome, directory = finished
    # trials ran 4 epochs: the final retrains up to 8, stopped after 2 without a better score
    assert final_training(cfg, 4) == (8, 2)
    training = json.loads((directory / "model.json").read_text())["training"]
    assert (training["trial_epochs"], training["max_epochs"], training["patience"]) == (4, 8, 2)
    for result in outcome.results.values():
        for run in result.runs:
            history = [r.val_accuracy for r in run.history]
            assert run.best_epoch == history.index(max(history)) + 1
            # every seed trained all 8 epochs, or stopped 2 after its best
            assert run.epochs_trained == 8 or run.epochs_trained == run.best_epoch + 2
    best = outcome.results[outcome.saved].best_run()
    assert training["epochs"] == best.epochs_trained and training["best_epoch"] == best.best_epoch
    report = (directory / "report.md").read_text(encoding="utf-8")
    assert ("for up to 8 epochs (the search's trials ran 4), stopped after 2 epochs without a "
            "better validation accuracy") in report
    assert "--final-epochs 8 --final-patience 2" in report  # the commands that redo it


def test_the_saved_config_is_the_best_on_validation_never_on_test():
    from search.retrain import ConfigResult, SeedRun

    def result(label, *scores):  # (validation, test) per seed
        return ConfigResult(label, None, 1, [SeedRun(i, [], 1, val, {}, {"accuracy": test})
                                             for i, (val, test) in enumerate(scores)])

    results = {"best found": result("best found", (0.90, 0.99), (0.93, 0.90)),
               "lecture net": result("lecture net", (0.92, 0.99)),
               "exercise net": result("exercise net", (0.93, 0.99))}
    assert final_module.choose_saved(results) == "best found"  # a tie stays with it
    results["lecture net"] = result("lecture net", (0.94, 0.80))
    assert final_module.choose_saved(results) == "lecture net"
    # a reference over a deployment limit is never saved, however it scored
    assert final_module.choose_saved(results, {"exercise net"}) == "best found"  # it ties
    assert final_module.choose_saved(results, {"lecture net"}) == "lecture net"
    results["best found"] = ConfigResult("best found", None, 1, [], ["seed 0: diverged"])
    assert final_module.choose_saved(results) == "lecture net"


def test_a_reference_net_that_wins_on_validation_is_saved_reloaded_and_named(finished,
                                                                            tmp_path,
                                                                            monkeypatch):
    cfg, study, _, _ = finished
    monkeypatch.setattr(final_module, "choose_saved",
                        lambda results, eligible=None: "lecture net")
    outcome = final_module.run_final(study, dataclasses.replace(
        cfg, final_seeds=1, runs_dir=str(tmp_path)))
    directory = tmp_path / study.study_name
    info = json.loads((directory / "model.json").read_text())
    assert info["config"] == "lecture net" and info["trial_number"] is None
    lecture = outcome.spec.references["lecture"]
    loaded = load_model(directory / "model.pt")
    assert loaded.params == lecture  # the lecture net's own params, not the best trial's
    assert info["training"]["seed"] == outcome.results["lecture net"].best_run().seed
    report = (directory / "report.md").read_text(encoding="utf-8")
    assert "**Saved model: the lecture net, which scored higher on validation" in report
    assert study.user_attrs["final"]["config"] == "lecture net"


@pytest.mark.parametrize("given, expected", [
    ({}, (16, 4)), ({"final_epochs": 5}, (5, 4)), ({"final_patience": 0}, (16, None)),
    ({"final_epochs": 8, "final_patience": 1}, (8, 1))])
def test_final_training_rule_and_flags(given, expected):
    assert final_training(RunConfig(study="cnn", **given), 8) == expected
    assert final_training(RunConfig(study="cnn"), 1) == (2, 2)  # at least 2 epochs' patience


def test_evaluate_prints_the_reports_accuracy_exactly(finished, capsys):
    _, _, outcome, directory = finished
    assert evaluate_module.main([str(directory / "model.pt")]) == 0
    printed = capsys.readouterr().out
    line = re.search(r"test accuracy [0-9.]+ \(\d+/\d+\), macro F1 [0-9.]+", printed).group(0)
    assert line in (directory / "report.md").read_text()
    assert "macro avg" in printed and printed.count("\n") > 12


def test_evaluate_refuses_data_of_another_shape(finished, capsys):
    _, _, _, directory = finished
    assert evaluate_module.main([str(directory / "model.pt"), "--data", "mnist-5k"]) == 2
    assert "takes 1x8x8 images" in capsys.readouterr().err


def test_onnx_agrees_and_a_wrong_model_is_caught(finished):
    _, _, outcome, directory = finished
    onnx_agrees(directory / "model.onnx", load_model(directory / "model.pt").model,
                outcome.dataset.test.x)
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["onnx_check"]["images"] == len(outcome.dataset.test.x)
    other = outcome.spec.build(outcome.spec.references["lecture"], (1, 8, 8), 10, 0.3, 0.4)
    with pytest.raises(ModelFileError, match="onnxruntime disagrees"):
        check_onnx(directory / "model.onnx", other.model, outcome.dataset.test.x)


def test_metrics_json_has_per_class_scores(finished):
    _, _, _, directory = finished
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert all(set(m) == {"precision", "recall", "f1", "support"}
               for m in metrics["per_class"].values())
    assert sum(m["support"] for m in metrics["per_class"].values()) == metrics["n_test"]
    assert np.asarray(metrics["confusion_matrix"]).sum() == metrics["n_test"]


def test_report_contents(finished):
    _, study, outcome, directory = finished
    md = (directory / "report.md").read_text()
    per_class = re.search(r"\| class \| precision \| recall \| F1 \| support \|\n\|.*\|\n"
                          r"((?:\|.*\|\n)+)", md).group(1)
    assert len(per_class.strip().splitlines()) == 10  # a row per class
    comparison = md.split("## Reference configs and best found")[1].split("##")[0]
    for label in ("best found", "lecture net", "seed net"):
        assert f"| {label} |" in comparison
    assert "From the lecture net to the best found" in comparison
    for heading in ("## Data", "## Search", "## Best parameters", "## Reproduce"):
        assert heading in md
    assert "on boundary" in md and "python -m search.run --study mlp" in md
    for figure in ("history", "slices", "curves", "confusion"):
        assert (directory / "figures" / f"{figure}.png").is_file()
        assert f"figures/{figure}.png" in md
    page = (directory / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "src='figures/" not in page
    assert "<table>" in page and "macro avg" in page


def test_dashboard_api_lists_artifacts_and_note(finished):
    from optuna_dashboard import wsgi

    cfg, study, _, directory = finished
    opened = storage.open(cfg.storage)
    app = wsgi(opened, artifact_store=storage.artifact_store(cfg.storage))
    code, body = wsgi_get(app, f"/api/studies/{study._study_id}")
    assert code.startswith("200")
    detail = json.loads(body)
    names = {a["filename"] for a in detail["artifacts"]}
    assert set(FILES) <= names and "confusion.png" in names
    assert "Final model" in detail["note"]["body"] and "test accuracy" in detail["note"]["body"]
    model_pt = next(a for a in detail["artifacts"] if a["filename"] == "model.pt")
    code, body = wsgi_get(app, f"/artifacts/{study._study_id}/{model_pt['artifact_id']}")
    assert code.startswith("200") and body == (directory / "model.pt").read_bytes()


def test_final_cli_unknown_study_and_no_completed_trial(finished, tmp_path, capsys):
    cfg, _, _, _ = finished
    assert final_module.main(["--study-name", "nope", "--storage", cfg.storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    empty = optuna.create_study(storage=cfg.storage, study_name="empty")
    with pytest.raises(ConfigError, match="no completed trial"):
        final_module.run_final(empty, cfg)


# --- every way model.pt / model.json can be wrong --------------------------------------


@pytest.fixture
def copy(finished, tmp_path):
    _, _, _, directory = finished
    for name in ("model.pt", "model.json"):
        shutil.copy(directory / name, tmp_path / name)
    return tmp_path


def _set_json(folder, **changes):
    info = json.loads((folder / "model.json").read_text())
    info.update(changes)
    (folder / "model.json").write_text(json.dumps(info))


def test_truncated_weights(copy):
    data = (copy / "model.pt").read_bytes()
    (copy / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.pt: sha256 .* truncated, corrupted"):
        load_model(copy / "model.pt")


def test_corrupted_weights_with_matching_digest(copy):
    (copy / "model.pt").write_bytes(b"this is not a zip archive at all")
    _set_json(copy, sha256=sha256_of(copy / "model.pt"))
    with pytest.raises(ModelFileError, match="not a readable PyTorch file"):
        load_model(copy / "model.pt")


def test_missing_or_broken_json(copy):
    (copy / "model.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"model\.json: not valid JSON"):
        load_model(copy / "model.pt")
    (copy / "model.json").unlink()
    with pytest.raises(ModelFileError, match=r"model\.json: missing"):
        load_model(copy / "model.pt")
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(copy / "other.pt")


def test_wrong_format_version(copy):
    _set_json(copy, format="someone-else/7")
    with pytest.raises(ModelFileError, match="format 'someone-else/7'"):
        load_model(copy / "model.pt")


def test_wrong_architecture_names_what_differs(copy):
    info = json.loads((copy / "model.json").read_text())
    params = dict(info["params"])
    params["n_units_l0"] = params["n_units_l0"] + 1
    _set_json(copy, params=params)
    with pytest.raises(ModelFileError, match=r"does not fit the architecture in model\.json: "
                                             r"it describes [0-9,]+ numbers, model\.pt holds "
                                             r"[0-9,]+ \(shapes net\.2\.weight \[\d+, \d+\] "
                                             r"\(expects"):
        load_model(copy / "model.pt")


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_that_would_run_code_is_refused(copy, monkeypatch):
    monkeypatch.chdir(copy)
    torch.save({"weights": _RunsCode()}, copy / "model.pt")
    _set_json(copy, sha256=sha256_of(copy / "model.pt"))  # an attacker can fix the digest
    with pytest.raises(ModelFileError, match="refused: it holds pickled objects"):
        load_model(copy / "model.pt")
    assert not (copy / "PWNED").exists()


def test_evaluate_cli_reports_a_bad_file_in_one_line(copy, capsys):
    (copy / "model.pt").write_bytes(b"")
    assert evaluate_module.main([str(copy / "model.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pt" in err[0]


def test_onnx_export_keeps_stdout_clean(finished, capfd):
    _, _, outcome, directory = finished
    from search.export import export_onnx

    model = load_model(directory / "model.pt").model
    export_onnx(model, directory.parent / "again.onnx", outcome.dataset.test.x[:2].float() / 255)
    assert capfd.readouterr().out == ""
    assert (directory.parent / "again.onnx").stat().st_size > 1000


def test_final_cli_rebuilds_the_run_settings_from_the_study(finished, tmp_path):
    cfg, study, _, _ = finished
    assert final_module.main(["--study-name", study.study_name, "--storage", cfg.storage,
                              "--final-seeds", "1", "--runs-dir", str(tmp_path)]) == 0
    info = json.loads((tmp_path / study.study_name / "model.json").read_text())
    assert info["training"]["trial_epochs"] == cfg.epochs  # the searched epochs, not the default
    assert info["training"]["batch_size"] == cfg.batch_size
    assert len(info["training"]["seeds"]) == 1


def test_the_final_step_counts_its_steps_in_the_log(finished, tmp_path, caplog):
    cfg, study, _, _ = finished
    caplog.set_level("INFO", logger="search")
    final_module.run_final(study, dataclasses.replace(cfg, final_seeds=2,
                                                      runs_dir=str(tmp_path)))
    steps = [m.group(1, 2) for r in caplog.records
             if (m := re.match(r"final step (\d+)/(\d+): ", r.getMessage()))]
    # 2 seeds of the best found and of each of the two reference nets, then the 4 writes
    total = 2 * 3 + len(final_module.WRITE_STEPS)
    assert steps == [(str(k), str(total)) for k in range(1, total + 1)]


def test_steps_draw_a_bar_on_a_terminal_and_only_log_lines_elsewhere(monkeypatch, caplog):
    import io
    import sys

    from search.cli import Steps

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    caplog.set_level("INFO", logger="search")
    for stream, bar in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        steps = Steps(2, "final step")
        steps("one")
        steps("two")
        steps.close()
        assert ("final step: 100%" in stream.getvalue() and "2/2" in stream.getvalue()) == bar
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["final step 1/2: one", "final step 2/2: two"] * 2


# Last in this module: it replaces the shared fixture's run folder.
def test_a_second_final_keeps_the_first_and_a_failed_one_changes_nothing(finished,
                                                                         monkeypatch):
    cfg, study, _, directory = finished
    runs = directory.parent
    first = {name: sha256_of(directory / name) for name in FILES}
    before = sorted(p.name for p in runs.iterdir())
    stored = storage.artifact_dir(cfg.storage, cfg.artifact_dir)
    artifacts = sorted(p.name for p in stored.iterdir())
    ids = dict(study.user_attrs["final"]["artifacts"])
    (stored / ids["model.json"]).write_text("stale")  # to see it written over below

    def broken_export(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(final_module.export, "export_onnx", broken_export)
    with pytest.raises(RuntimeError, match="simulated"):
        final_module.run_final(study, cfg)
    assert {name: sha256_of(directory / name) for name in FILES} == first
    assert sorted(p.name for p in runs.iterdir()) == before  # no partial folder
    monkeypatch.undo()

    final_module.run_final(study, cfg)
    kept = [p for p in runs.iterdir() if p.name.startswith("mlp-digits.previous-")]
    assert len(kept) == 1 and sorted(p.name for p in runs.iterdir()) == sorted(
        [*before, kept[0].name])
    assert {name: sha256_of(kept[0] / name) for name in FILES} == first
    # the artifacts were written over, not stored again: the same ids, the new bytes
    again = optuna.load_study(study_name=study.study_name, storage=cfg.storage)
    assert again.user_attrs["final"]["artifacts"] == ids
    assert sorted(p.name for p in stored.iterdir()) == artifacts
    assert sha256_of(stored / ids["model.json"]) == sha256_of(directory / "model.json")
    info = json.loads((directory / "model.json").read_text(encoding="utf-8"))
    assert info["sha256"] == sha256_of(directory / "model.pt")  # one run's files, not a mix
    saved = load_model(directory / "model.pt").info
    assert saved["trial_number"] == (study.best_trial.number
                                     if saved["config"] == "best found" else None)
    report = (directory / "report.md").read_bytes().decode("utf-8")
    assert "±" in report  # written as UTF-8
    assert f"search.replay --storage sqlite:///{runs.parent}" in report
    assert "CPU thread count;\n# equal to its stored value on the CPU" in report


def test_a_reference_that_diverges_on_every_seed_is_reported_not_fatal(tmp_path, monkeypatch):
    from search import registry

    spec = registry.get("mlp")
    exploding = dataclasses.replace(spec.references["seed"], optimizer="sgd", lr=1e12)
    patched = dataclasses.replace(spec, references={**spec.references, "seed": exploding})
    monkeypatch.setattr(registry, "STUDIES", {**registry.STUDIES, "mlp": patched})
    cfg = RunConfig(study="mlp", data="digits", n_trials=1, epochs=2, final_seeds=2,
                    storage=f"sqlite:///{tmp_path / 'studies.db'}", runs_dir=str(tmp_path))
    study, opened, dataset = search(cfg)  # trial 0 is the lecture net, which trains
    outcome = final_module.run_final(study, cfg, opened, dataset)
    assert not outcome.results["seed net"].runs and outcome.results["seed net"].failures
    report = (tmp_path / "mlp-digits" / "report.md").read_text(encoding="utf-8")
    assert "diverged" in report
    metrics = json.loads((tmp_path / "mlp-digits" / "metrics.json").read_text())
    assert metrics["comparison"]["seed net"]["seeds"] == []


def test_publishing_keeps_the_newest_previous_run_only(tmp_path):
    """Each final run moves the one before it aside; of those, the newest stays and older
    ones go (a vgg16 final run is hundreds of MB)."""
    import os

    directory = tmp_path / "runs" / "s"
    for i in range(3):
        staging = tmp_path / "runs" / f".s.partial-{i}"
        staging.mkdir(parents=True)
        (staging / "model.pt").write_text(f"run {i}")
        final_module._publish(staging, directory)
        os.utime(directory, (1_000_000 + 1000 * i,) * 2)  # made at distinct times
    previous = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "s")
    assert len(previous) == final_module.KEEP_PREVIOUS == 1
    assert (tmp_path / "runs" / previous[0] / "model.pt").read_text() == "run 1"
    assert (directory / "model.pt").read_text() == "run 2"
