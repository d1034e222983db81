"""Deployment costs counted before training (search.costs), and the limits that keep a config
over them from ever being trained."""

from __future__ import annotations

import json
import re

import onnxruntime
import optuna
import pytest
import torch

from search import costs, export, registry
from search import evaluate as evaluate_module
from search.config import RunConfig
from search.errors import ConfigError
from search.final import run_final
from search.run import search
from spaces import cnn as cnn_space
from spaces import mlp as mlp_space
from spaces import vgg16 as vgg16_space


def _real(spec, params, shape, **options):
    return spec.build(params, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0],
                      **options).model


@pytest.mark.parametrize("study, space", [("mlp", mlp_space), ("cnn", cnn_space)])
def test_parameters_and_bytes_match_the_real_model(study, space):
    spec = registry.get(study)
    for params in space.REFERENCES.values():
        for shape in ((1, 28, 28), (3, 32, 32)):
            counted = costs.measure(spec, params, shape, 10)
            model = _real(spec, params, shape)
            assert counted.params == counted.trainable == sum(
                p.numel() for p in model.parameters())
            assert counted.weight_bytes == sum(
                t.numel() * t.element_size() for t in model.state_dict().values())


def test_multiply_adds_known_answers():
    # the lecture CNN on 28x28: conv 1->32 (26x26 out), conv 32->64 (24x24), then 9216->128->10
    lecture = costs.measure(registry.get("cnn"), cnn_space.LECTURE, (1, 28, 28), 10)
    assert lecture.macs == 26 * 26 * 32 * 9 + 24 * 24 * 64 * 32 * 9 + 9216 * 128 + 128 * 10
    # an MLP: one multiply-add per weight of each Linear layer
    mlp = costs.measure(registry.get("mlp"), mlp_space.LECTURE, (1, 28, 28), 10)
    widths = mlp_space.LECTURE.widths
    sizes = [784, *widths, 10]
    assert mlp.macs == sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))


def test_a_frozen_backbone_counts_in_the_saved_model_but_is_not_trained():
    spec = registry.get("vgg16")
    head = costs.measure(spec, vgg16_space.EXERCISE, (1, 28, 28), 10,
                         **registry.saved_options(spec, 32))
    # classifier[6] alone is trained: 4096 x 10 + 10
    assert head.trainable == 4096 * 10 + 10
    assert head.params > 14_000_000  # VGG16's 13 convolutions alone hold 14.7M
    assert head.macs > 300_000_000  # 13 convolutions on a 32 px image
    bigger = costs.measure(spec, vgg16_space.EXERCISE, (1, 28, 28), 10,
                           **registry.saved_options(spec, 64))
    assert bigger.macs > 3.5 * head.macs  # four times the pixels


def test_violations_are_relative_and_signed():
    cost = costs.Costs(params=1_500, trainable=1_500, macs=10_000, weight_bytes=6_000)
    assert cost.violations({"max_params": 1_000, "max_flops": None}) == [pytest.approx(0.5)]
    assert cost.violations({"max_params": 3_000, "max_flops": 20_000}) == [
        pytest.approx(-0.5), pytest.approx(-0.5)]
    assert cost.over({"max_params": 1_000, "max_flops": None}) == (
        "1,500 params over --max-params 1,000")
    assert cost.over({"max_params": None, "max_flops": 10_000}) is None  # at the limit is in


@pytest.mark.parametrize("flag", ["max_params", "max_flops"])
def test_limits_are_checked_like_every_count(flag):
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} must be between 1"):
        RunConfig(study="mlp", **{flag: 0})
    assert not RunConfig(study="mlp").constrained
    assert RunConfig(study="mlp", **{flag: 10}).constrained


def test_no_config_over_the_limit_is_trained_and_the_final_model_is_within_it(tmp_path,
                                                                             capsys):
    limit = 20_000
    cfg = RunConfig(study="mlp", data="digits", n_trials=12, epochs=1, workers=1,
                    storage=f"sqlite:///{tmp_path / 'studies.db'}", max_params=limit,
                    runs_dir=str(tmp_path / "runs"), final_seeds=1)
    study, opened, dataset = search(cfg)
    infeasible = [t for t in study.trials if "infeasible" in t.user_attrs]
    feasible = [t for t in study.trials if "infeasible" not in t.user_attrs]
    assert infeasible and feasible  # the draws fall on both sides of the limit
    for trial in infeasible:
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert trial.user_attrs["costs"]["params"] > limit
        # never trained: no epoch, no score, no model built
        assert not trial.intermediate_values and "seconds_per_epoch" not in trial.user_attrs
        assert "n_parameters" not in trial.user_attrs
        assert trial.user_attrs["constraints"][0] > 0
    for trial in feasible:
        assert trial.user_attrs["costs"]["params"] <= limit
        assert trial.user_attrs["constraints"][0] <= 0
        assert trial.user_attrs["n_parameters"] == trial.user_attrs["costs"]["trainable"]
    # TPE was told each finished trial's constraint values (per trial on Optuna 5, through
    # constraints_func before)
    for trial in study.trials:
        told = trial.constraints if hasattr(trial, "constraints") else dict(
            enumerate(trial.system_attrs["constraints"]))
        assert list(told.values()) == trial.user_attrs["constraints"]
    assert study.best_trial in feasible
    outcome = run_final(study, cfg, opened, dataset)
    directory = tmp_path / "runs" / "mlp-digits"
    info = json.loads((directory / "model.json").read_text())
    assert info["n_parameters_total"] <= limit
    # the reference nets (over the limit here) are retrained for comparison, never saved
    assert info["config"] == "best found" and outcome.saved == "best found"
    assert min(outcome.results[label].n_parameters for label in outcome.results
               if label != "best found") > limit
    assert info["costs"] == study.best_trial.user_attrs["costs"]
    assert outcome.results["best found"].n_parameters <= limit
    # search.evaluate prints the saved model's costs beside its accuracy
    assert evaluate_module.main([str(directory / "model.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"costs: {info['costs']['params']:,} parameters, " in printed
    assert f"{info['costs']['weight_bytes'] / 1e6:.3g} MB of weights" in printed
    # and the latency of model.onnx measured on this machine's CPU
    assert re.search(r"latency of model\.onnx: [0-9.e-]+ ms per image at batch 1, [0-9.e-]+ ms "
                     r"at batch 64 \(onnxruntime [0-9.]+, CPU, .+\)", printed)
    latency = json.loads((directory / "metrics.json").read_text())["onnx_check"]["latency"]
    assert latency["batch_1_ms_per_image"] > 0 and latency["batch_64_ms_per_image"] > 0
    assert latency["cpu"] == costs.cpu_name() and latency["batch_1_runs"] >= 3
    # the report's comparison gives every config's multiply-adds
    report = (directory / "report.md").read_text(encoding="utf-8")
    assert "multiply-adds / image" in report and f"{info['costs']['macs']:,}" in report
    assert "latency of model.onnx: " in report


@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_latency_is_timed_at_batch_1_and_64_without_touching_the_random_state(runtime):
    spec = registry.get("cnn")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    latency = costs.measure_latency(spec, cnn_space.LECTURE, (1, 28, 28), 10, "cpu", runtime)
    assert torch.equal(torch.rand(3), expected)  # a trial's seeded draws are not shifted
    assert latency.ms_per_image > 0 and latency.batch_ms_per_image > 0
    least, most = costs.TRIAL_TIMING[1][1]
    assert least <= latency.runs <= most
    threads = f"{costs.cpu_name()}, {torch.get_num_threads()} thread"
    assert latency.where.startswith(
        f"ONNX Runtime {onnxruntime.__version__}, {threads}" if runtime == "onnxruntime"
        else threads)
    counted = costs.measure(spec, cnn_space.LECTURE, (1, 28, 28), 10).with_latency(latency)
    assert counted.as_attrs()["latency_ms"] == latency.ms_per_image
    assert counted.as_attrs()["latency_64_ms"] == latency.batch_ms_per_image
    assert "ms per image at batch 1, " in counted.describe()
    # a search that times nothing keeps the counts alone
    assert "latency_ms" not in costs.measure(spec, cnn_space.LECTURE, (1, 28, 28),
                                             10).as_attrs()


def test_onnx_runtime_times_the_model_the_trial_would_build(monkeypatch):
    """The session timed is the study's model itself, exported with its random weights: it
    gives the PyTorch model's scores, at batch 1 and 64 alike (a dynamic batch axis)."""
    sessions = []
    opened = costs._onnx_session
    monkeypatch.setattr(costs, "_onnx_session",
                        lambda path, threads: sessions.append(opened(path, threads))
                        or sessions[-1])
    spec = registry.get("cnn")
    torch.manual_seed(3)
    costs.measure_latency(spec, cnn_space.EXERCISE, (1, 28, 28), 10, "cpu", "onnxruntime")
    torch.manual_seed(3)  # the same draws as inside: the model, then the images
    model = costs._build(spec, cnn_space.EXERCISE, (1, 28, 28), 10).eval()
    images = torch.rand((64, 1, 28, 28))
    with torch.inference_mode():
        expected = model(images).numpy()
    (session,) = sessions
    for batch in costs.LATENCY_BATCHES:
        got = session.run(None, {"image": images[:batch].numpy()})[0]
        assert got.shape == (batch, 10)
        assert abs(got - expected[:batch]).max() < 1e-4


def test_an_exporter_that_fails_gives_way_to_the_next(tmp_path, monkeypatch, caplog):
    def refused(*args):
        raise RuntimeError("exporter removed from this PyTorch")

    monkeypatch.setitem(export._EXPORT, "torchscript", refused)
    model = costs._build(registry.get("mlp"), mlp_space.LECTURE, (1, 28, 28), 10)
    path = tmp_path / "model.onnx"
    used = export.export_onnx(model, path, torch.rand(2, 1, 28, 28),
                              exporters=("torchscript", "dynamo"))
    assert used == "dynamo" and path.stat().st_size > 0
    assert "torchscript ONNX export failed (exporter removed from this PyTorch); using the " \
           "dynamo exporter" in caplog.text
    with pytest.raises(RuntimeError, match="exporter removed"):
        export.export_onnx(model, path, torch.rand(2, 1, 28, 28), exporters=("torchscript",))


def test_a_latency_limit_says_where_it_was_measured():
    cost = costs.Costs(params=10, trainable=10, macs=10, weight_bytes=40, latency_ms=2.5,
                       latency_on="a CPU, 1 thread")
    assert cost.violations({"max_latency_ms": 2.0}) == [pytest.approx(0.25)]
    assert cost.over({"max_latency_ms": 2.0}) == (
        "2.5 ms per image over --max-latency-ms 2 (measured on a CPU, 1 thread)")
    assert cost.over({"max_latency_ms": 2.5}) is None
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--max-latency-ms must be milliseconds above 0"):
            RunConfig(study="mlp", max_latency_ms=bad)
    cfg = RunConfig(study="mlp", max_latency_ms=0.5)
    assert cfg.constrained and cfg.timed and not RunConfig(study="mlp").timed


def test_no_config_over_the_latency_limit_is_trained(tmp_path, monkeypatch):
    """The limit's path through the search, with a latency that is a known function of the
    model (a thousandth of a millisecond per parameter), as a machine's timing is not."""
    def by_size(spec, params, shape, n_classes, device, runtime, **options):
        counted = costs.measure(spec, params, shape, n_classes, **options)
        return costs.Latency(counted.params / 1000, counted.params / 2000, "a known function", 5)

    monkeypatch.setattr(costs, "measure_latency", by_size)
    limit = 20.0
    cfg = RunConfig(study="mlp", data="digits", n_trials=10, epochs=1, workers=1,
                    storage=f"sqlite:///{tmp_path / 'studies.db'}", max_latency_ms=limit,
                    runs_dir=str(tmp_path / "runs"), final=False)
    study, _, _ = search(cfg)
    infeasible = [t for t in study.trials if "infeasible" in t.user_attrs]
    feasible = [t for t in study.trials if "infeasible" not in t.user_attrs]
    assert infeasible and feasible
    for trial in infeasible:
        assert trial.user_attrs["costs"]["latency_ms"] > limit
        assert "--max-latency-ms 20" in trial.user_attrs["infeasible"]
        assert not trial.intermediate_values and "n_parameters" not in trial.user_attrs
    for trial in feasible:
        assert trial.user_attrs["costs"]["latency_ms"] <= limit
        assert trial.user_attrs["costs"]["latency_on"] == "a known function"
    assert study.best_trial in feasible


def test_a_study_saved_before_the_runtime_choice_is_read_as_timed_in_pytorch():
    from search.study import config_of_study

    older = optuna.create_study()
    older.set_user_attr("config", {"study": "cnn", "max_latency_ms": 2.0})
    assert config_of_study(older).latency_runtime == "pytorch"
    newer = optuna.create_study()
    newer.set_user_attr("config", RunConfig(study="cnn", max_latency_ms=2.0).to_dict())
    assert config_of_study(newer).latency_runtime == "onnxruntime"
    # the name of its axis: a latency in PyTorch keeps the name it had
    assert RunConfig(study="cnn", objectives="accuracy,latency",
                     latency_runtime="pytorch").metric_names()[1] == "milliseconds per image"
