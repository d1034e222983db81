"""The vgg16 study end to end on tiny data with random weights (ImageNet's cannot be
downloaded here): cached features, head-only trials, the whole network saved, reloaded,
evaluated and exported, and the report beside an mlp study."""

from __future__ import annotations

import dataclasses
import json
import re

import optuna
import pytest
import torch

from search import evaluate as evaluate_module
from search import final as final_module
from search.config import RunConfig
from search.errors import ConfigError
from search.export import load_model
from search.run import main, search
from search.train import predict_scores
from tests.conftest import onnx_agrees

# backbone passes (search.features.run_backbone, FrozenVGG16.features) made while a trial
# ran, counted by the fixture below
BACKBONE_IN_TRIALS: list[str] = []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from search import features as features_module
    from search import objective as objective_module
    from search.models.vgg16 import FrozenVGG16
    from search.objective import worker_id

    root = tmp_path_factory.mktemp("vgg16")
    # one worker: every trial runs in this process, where the backbone's calls are counted
    # (a module fixture is set up before the per-test one that sets this for other tests)
    common = dict(data="digits", storage=f"sqlite:///{root / 'studies.db'}", final_seeds=1,
                  runs_dir=str(root / "runs"), epochs=2, workers=1)
    mlp_cfg = RunConfig(study="mlp", n_trials=2, **common)
    study, opened, dataset = search(mlp_cfg)
    mlp = final_module.run_final(study, mlp_cfg, opened, dataset)
    cfg = RunConfig(study="vgg16", n_trials=3, weights="none", **common)
    in_trial: list[int] = []

    def counting(name, real):
        def counted(*args, **kwargs):
            # a pass on the meta device (search.costs counting the saved model) computes
            # nothing
            if in_trial and not any(getattr(a, "is_meta", False) for a in args):
                BACKBONE_IN_TRIALS.append(name)
            return real(*args, **kwargs)
        return counted

    def trial_call(real):
        def call(self, trial):
            in_trial.append(trial.number)
            try:
                return real(self, trial)
            finally:
                in_trial.pop()
        return call

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(features_module, "run_backbone",
                        counting("run_backbone", features_module.run_backbone))
        patched.setattr(FrozenVGG16, "features",
                        counting("FrozenVGG16.features", FrozenVGG16.features))
        patched.setattr(objective_module.Objective, "__call__",
                        trial_call(objective_module.Objective.__call__))
        study, opened, dataset = search(cfg)
    assert len(study.trials) == 3 and not in_trial
    assert {t.user_attrs["worker"] for t in study.trials} == {worker_id()}
    outcome = final_module.run_final(study, cfg, opened, dataset)
    return cfg, study, outcome, root / "runs" / "vgg16-digits", mlp


def test_trials_never_run_the_backbone(finished):
    _, study, _, _, _ = finished
    assert study.trials[0].user_attrs["reference"] == "exercise"
    assert study.trials[0].params["head"] == "exercise"
    assert all(t.user_attrs["backbone_runs"] == 0 for t in study.trials)
    # counted from outside: the features were made before the first trial, in the
    # objective's constructor, and no trial ran the backbone
    assert BACKBONE_IN_TRIALS == []
    assert study.user_attrs["backbone"]["weights"]["kind"] == "none"
    assert study.user_attrs["backbone"]["input_size"] == 32


def test_the_whole_network_is_saved_reloaded_and_exported(finished):
    _, _, outcome, directory, _ = finished
    info = json.loads((directory / "model.json").read_text())
    assert info["study"] == "vgg16" and info["options"] == {"input_size": 32, "fold": True}
    assert info["weights"]["kind"] == "none" and len(info["weights"]["sha256"]) == 64
    assert info["n_parameters"] < info["n_parameters_total"]
    assert info["input"]["applied"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    loaded = load_model(directory / "model.pt")  # images in, not features
    assert all(not p.requires_grad for p in loaded.model.frozen.parameters())
    scores = predict_scores(loaded.model, outcome.dataset.test.x)
    accuracy = float((scores.argmax(1) == outcome.dataset.test.y).float().mean())
    assert accuracy == pytest.approx(outcome.test["accuracy"])
    onnx_agrees(directory / "model.onnx", loaded.model, outcome.dataset.test.x)
    # the backbone in model.pt is the weights' own: frozen means frozen through the final step
    state = torch.load(directory / "model.pt", weights_only=True)
    first = outcome.weights.state["features.0.weight"]
    assert torch.equal(state["frozen.0.0.weight"], first)


def test_evaluate_prints_the_reports_accuracy(finished, capsys):
    _, _, _, directory, _ = finished
    assert evaluate_module.main([str(directory / "model.pt")]) == 0
    line = re.search(r"test accuracy [0-9.]+ \(\d+/\d+\), macro F1 [0-9.]+",
                     capsys.readouterr().out).group(0)
    assert line in (directory / "report.md").read_text()


def test_report_and_note_say_random_weights_and_explain_from_the_run(finished):
    cfg, study, outcome, directory, mlp = finished
    md = (directory / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Random backbone weights (`--weights none`)**")
    assert "does not normalize with the training split's statistics" in md
    section = md.split("## Frozen VGG16: what this run measured")[1].split("\n## ")[0]
    info = outcome.model_info
    assert f"{info['n_parameters']:,} trained (the head) of {info['n_parameters_total']:,}" \
        in section
    assert "ms per image" in section
    # what the trials' numbers were made at, against the saved float32 network's
    from search.features import backbone_speed

    made_at = str(backbone_speed(torch.device("cpu")).autocast or torch.float32)
    precision = next(line for line in section.splitlines() if line.startswith("| precision"))
    assert f"made at {made_at.removeprefix('torch.')}, stored as float16" in precision
    assert f"float32 on images: {outcome.test['accuracy']:.4f}" in precision
    others = md.split("## Other studies on the same data")[1].split("\n## ")[0]
    assert f"| mlp-digits | mlp | {mlp.test['accuracy']:.4f} |" in others
    # the explanation is there exactly when the mlp study won
    loses = mlp.test["accuracy"] > outcome.test["accuracy"]
    assert ("**Why VGG16 loses here**" in section) == loses
    assert ("weights are random" in section) == loses
    from optuna_dashboard._note import get_note_from_system_attrs

    stored = optuna.load_study(study_name=study.study_name, storage=cfg.storage)
    attrs = stored._storage.get_study_system_attrs(stored._study_id)
    note = get_note_from_system_attrs(attrs, None)["body"]
    assert note.startswith("**Random backbone weights")


def test_no_weights_offline_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["--study", "vgg16", "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vgg16-397923af.pth" in err[0]
    assert "--weights PATH" in err[0] and "--weights none" in err[0]
    assert not (tmp_path / "studies.db").exists() and not (tmp_path / "runs").exists()


def test_a_bad_weights_file_is_one_line(tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(b"not torch")
    assert main(["--study", "vgg16", "--data", "digits", "--weights", "w.pth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w.pth: not a readable PyTorch file" in err[0]
    assert not (tmp_path / "studies.db").exists()


def test_resuming_with_other_weights_or_size_is_refused(finished):
    cfg, _, _, _, _ = finished
    with pytest.raises(ConfigError, match="was made with none weights .* at input size 32"):
        search(dataclasses.replace(cfg, seed=1, n_trials=1, final=False))  # other random init
    with pytest.raises(ConfigError, match="this run has none .* at 64"):
        search(dataclasses.replace(cfg, input_size=64, n_trials=1, final=False))
