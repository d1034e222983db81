"""A search of accuracy against cost (--objectives): the study's directions and metric names,
successive halving among cost peers, and the final step over the Pareto front."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

import storage
from search import costs
from search.config import RunConfig, parse_objectives
from search.errors import ConfigError
from search.final import front_folder, front_trials, run_final
from search.objective import TrialRecorder
from search.replay import replay
from search.run import search
from search.study import CostPeerHalving, make_pruner, make_sampler
from tests.conftest import wsgi_get

State = optuna.trial.TrialState


def test_objectives_are_accuracy_then_known_costs_once():
    assert parse_objectives("accuracy") == ("accuracy",)
    assert parse_objectives("accuracy, params,flops") == ("accuracy", "params", "flops")
    assert parse_objectives(["accuracy", "flops"]) == ("accuracy", "flops")
    assert parse_objectives("accuracy,latency") == ("accuracy", "latency")
    for bad in ("params", "accuracy,speed", "accuracy,params,params", "latency,accuracy", ""):
        with pytest.raises(ConfigError, match="give accuracy, then any of"):
            parse_objectives(bad)
    assert RunConfig(study="mlp", objectives="accuracy,params").pareto
    assert not RunConfig(study="mlp").pareto
    with pytest.raises(ConfigError, match="--pruner hyperband ranks one objective"):
        RunConfig(study="mlp", objectives="accuracy,params", pruner="hyperband")
    assert isinstance(make_pruner("sha", 9, ("params",)), CostPeerHalving)
    assert not isinstance(make_pruner("sha", 9), CostPeerHalving)


@pytest.mark.parametrize("name", ["nsga2", "gp", "tpe"])
def test_each_sampler_for_several_objectives_repeats_its_draws_from_the_seed(name):
    """Seeded per trial number, as every sampler of the service: the same study seed gives
    the same trials, a pair of objectives at a time."""
    def objective(trial: optuna.Trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        width = trial.suggest_int("width", 8, 512, log=True)
        return 1.0 - (x - 0.3) ** 2, width

    def drawn(seed: int) -> list[dict]:
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=make_sampler(name, seed))
        study.optimize(objective, n_trials=11)  # past the 8 random trials of TPE and GP
        return [t.params for t in study.trials]

    first = drawn(3)
    assert drawn(3) == first
    assert drawn(4) != first


@pytest.mark.parametrize("name", ["tpe", "tpe-multivariate", "nsga2", "gp"])
def test_the_samplers_propose_past_pruned_trials_that_kept_their_scores(name):
    """Optuna holds no scores by epoch of a pruned trial of several objectives, and TPE
    ranks pruned trials by them with the study's one direction (which raises there); the
    service stores them, so its samplers are shown the pruned trials without them."""
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(name, 0))
    for i in range(12):
        values = [0.5 + i / 100, 1_000 + i]
        study.add_trial(optuna.trial.create_trial(
            state=State.COMPLETE if i % 3 == 0 else State.PRUNED,
            values=values if i % 3 == 0 else None, intermediate_values={1: 0.4 + i / 100},
            params={"x": i / 12}, distributions={
                "x": optuna.distributions.FloatDistribution(0.0, 1.0)}))
    study.optimize(lambda trial: (trial.suggest_float("x", 0.0, 1.0), 10.0), n_trials=3)
    assert [t.state for t in study.trials[-3:]] == [State.COMPLETE] * 3
    # the study itself still holds every score
    assert all(t.intermediate_values for t in study.trials[:12])


def _peer(params: int, at: dict[int, float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=State.PRUNED, intermediate_values=at,
        user_attrs={"costs": {"params": params, "macs": 10 * params}})


def _study_with(peers) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for peer in peers:
        study.add_trial(peer)
    return study


def test_a_trial_is_halved_only_among_trials_that_cost_no_more():
    pruner = CostPeerHalving(("params",))
    # five trials of 1,000 parameters, 0.90-0.94 after one epoch
    study = _study_with([_peer(1_000, {1: 0.90 + i / 100}) for i in range(5)])

    def asked(params: int, value: float, step: int = 1) -> bool:
        return pruner.prune(study, _peer(params, {step: value}))

    assert asked(1_000, 0.80)  # below the best third of six equals
    assert not asked(1_000, 0.95)  # above all of them
    assert asked(5_000, 0.80)  # larger and worse than smaller ones
    assert not asked(500, 0.10)  # cheaper than all: on the front whatever it scores
    assert not asked(1_000, 0.80, step=2)  # not a rung (1, 3, 9, ...)
    # at the third epoch none of the others has a score: no peers, no pruning
    assert not asked(1_000, 0.10, step=3)
    # a trial without costs (an older study's) is never pruned here
    assert not pruner.prune(study, optuna.trial.create_trial(
        state=State.PRUNED, intermediate_values={1: 0.1}))


def test_flops_and_params_together_need_no_more_on_both():
    pruner = CostPeerHalving(("params", "flops"))
    # cheaper in parameters but dearer in multiply-adds: not peers of a 1,000/10,000 trial
    study = _study_with([optuna.trial.create_trial(
        state=State.PRUNED, intermediate_values={1: 0.95},
        user_attrs={"costs": {"params": 500, "macs": 50_000}}) for _ in range(6)])
    assert not pruner.prune(study, _peer(1_000, {1: 0.10}))
    assert pruner.prune(study, optuna.trial.create_trial(
        state=State.PRUNED, intermediate_values={1: 0.10},
        user_attrs={"costs": {"params": 900, "macs": 60_000}}))


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_the_recorder_asks_the_cost_peer_pruner_of_a_pareto_study(tmp_path, backend):
    """Optuna refuses Trial.report and should_prune with several objectives; a trial of
    this service is still stopped at a rung, its score there stored."""
    url = None if backend == "memory" else f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(storage=url and storage.open(url),
                                directions=["maximize", "minimize"],
                                pruner=CostPeerHalving(("params",)))
    for i in range(5):
        study.add_trial(optuna.trial.create_trial(
            state=State.COMPLETE, values=[0.9 + i / 100, 1_000], intermediate_values={1: 0.9},
            user_attrs={"costs": {"params": 1_000, "macs": 10_000}}))

    def objective(params: int, score: float):
        def run(trial: optuna.Trial):
            trial.set_user_attr("costs", {"params": params, "macs": 10 * params})
            if TrialRecorder(trial).report(score, 1):
                raise optuna.TrialPruned()
            return score, params
        return run

    study.optimize(objective(1_000, 0.5), n_trials=1)
    study.optimize(objective(100, 0.5), n_trials=1)
    worse, cheaper = study.trials[-2:]
    assert worse.state == State.PRUNED and worse.intermediate_values == {1: 0.5}
    assert cheaper.state == State.COMPLETE and cheaper.values == [0.5, 100]


def test_front_models_are_spread_from_the_cheapest_to_the_most_accurate():
    study = optuna.create_study(directions=["maximize", "minimize"])
    front = [(0.50, 100), (0.60, 300), (0.70, 1_000), (0.80, 3_000), (0.85, 10_000),
             (0.90, 100_000)]
    for value in [*front, (0.55, 5_000), (0.40, 200)]:  # the last two are dominated
        study.add_trial(optuna.trial.create_trial(state=State.COMPLETE, values=list(value)))
    picked = [tuple(t.values) for t in front_trials(study, 3)]
    # between 100 and 100,000 on a log scale the middle is 3,162: the 3,000 one
    assert picked == [(0.50, 100), (0.80, 3_000), (0.90, 100_000)]
    assert [tuple(t.values) for t in front_trials(study, 2)] == [(0.50, 100), (0.90, 100_000)]
    assert [tuple(t.values) for t in front_trials(study, 1)] == [(0.90, 100_000)]
    assert len(front_trials(study, 10)) == len(front)
    assert front_folder(study.trials[2]) == "trial-2"
    # above a floor: the cheapest kept is the cheapest that scores above it
    assert [tuple(t.values) for t in front_trials(study, 2, floor=0.6)] == [
        (0.70, 1_000), (0.90, 100_000)]
    assert front_trials(study, 3, floor=0.9) == []


def test_the_final_step_leaves_out_front_trials_no_better_than_chance(tmp_path):
    """A net cheaper than every other is on the front whatever it scores: the final step
    retrains only those above chance, or above --front-floor."""
    cfg = RunConfig(study="mlp", data="digits", n_trials=1, epochs=1, workers=1,
                    storage=f"sqlite:///{tmp_path / 'studies.db'}", final_seeds=1,
                    objectives="accuracy,params", front_models=3,
                    runs_dir=str(tmp_path / "runs"), artifact_dir=str(tmp_path / "artifacts"))
    study, opened, dataset = search(cfg)
    real = study.trials[0]
    # a cheaper trial at chance (10 digits), and so on the front beside the real one
    study.add_trial(optuna.trial.create_trial(
        state=State.COMPLETE, values=[0.1, real.values[1] - 1], params=real.params,
        distributions=real.distributions, user_attrs=real.user_attrs))
    assert len(study.best_trials) == 2
    outcome = run_final(study, cfg, opened, dataset)
    assert [o.best_trial.number for o in outcome.front] == [real.number]
    with pytest.raises(ConfigError, match=r"no trial of the Pareto front scores above "
                                          r"--front-floor 0\.99 \(the best: 0\.\d{4}"):
        run_final(study, dataclasses.replace(cfg, front_floor=0.99), opened, dataset)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="--front-floor must be a validation accuracy"):
            RunConfig(study="mlp", front_floor=bad)


def test_a_pareto_search_ends_with_a_saved_model_per_front_point(tmp_path):
    cfg = RunConfig(study="mlp", data="digits", n_trials=8, epochs=3, workers=1,
                    storage=f"sqlite:///{tmp_path / 'studies.db'}", final_seeds=2,
                    objectives="accuracy,params", front_models=2,
                    runs_dir=str(tmp_path / "runs"), artifact_dir=str(tmp_path / "artifacts"))
    study, opened, dataset = search(cfg)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["validation accuracy", "parameters"]
    for trial in study.get_trials(states=(State.COMPLETE,)):
        assert trial.values[1] == trial.user_attrs["costs"]["params"]
    # a trial of the front trains again to its stored accuracy, the first of its values
    again = replay(study, study.best_trials[0].number)
    assert again.equal and again.value == study.best_trials[0].values[0], again.line()
    outcome = run_final(study, cfg, opened, dataset)
    directory = tmp_path / "runs" / study.study_name
    front = front_trials(study, 2)
    assert [o.best_trial.number for o in outcome.front] == [t.number for t in front]
    assert outcome is outcome.front[-1]
    for each, trial in zip(outcome.front, front, strict=True):
        folder = directory / front_folder(trial)
        assert each.directory == folder
        info = json.loads((folder / "model.json").read_text())
        assert info["trial_number"] == trial.number and info["config"] == "best found"
        assert info["costs"]["params"] == trial.values[1]
        assert len(info["training"]["seeds"]) == 2
        for name in ("model.pt", "model.onnx", "metrics.json", "report.md", "report.html"):
            assert (folder / name).is_file(), name
        assert f"Trial {trial.number} of the Pareto front" in (folder / "report.md").read_text()
    report = (directory / "report.md").read_text(encoding="utf-8")
    assert "accuracy against parameters" in report and "figures/front.png" in report
    assert (directory / "figures" / "front.png").stat().st_size > 10_000
    for trial in front:
        assert f"`{front_folder(trial)}/`" in report
    final = study.user_attrs["final"]  # as optuna-dashboard and other studies read it
    assert [f["trial"] for f in final["front"]] == [t.number for t in front]
    assert final["test_accuracy"] == outcome.test["accuracy"]
    assert f"{front_folder(front[0])}/model.onnx" in final["artifacts"]
    # optuna-dashboard's API gives its Pareto-front plot the directions, the axis names and
    # the front
    from optuna_dashboard import wsgi

    app = wsgi(storage.open(cfg.storage), artifact_store=storage.artifact_store(cfg.storage))
    code, body = wsgi_get(app, f"/api/studies/{study._study_id}")
    assert code.startswith("200")
    detail = json.loads(body)
    assert detail["directions"] == ["maximize", "minimize"]
    assert detail["objective_names"] == ["validation accuracy", "parameters"]
    assert sorted(t["number"] for t in detail["best_trials"]) == sorted(
        t.number for t in study.best_trials)



def test_a_latency_pareto_search_times_every_trial_and_the_front_side_by_side(tmp_path):
    cfg = RunConfig(study="mlp", data="digits", n_trials=5, epochs=1, workers=1,
                    storage=f"sqlite:///{tmp_path / 'studies.db'}", final_seeds=1,
                    objectives="accuracy,latency", front_models=2,
                    runs_dir=str(tmp_path / "runs"), artifact_dir=str(tmp_path / "artifacts"))
    assert cfg.timed
    study, opened, dataset = search(cfg)
    # the default runtime, named on the axis the dashboard draws
    assert study.metric_names == ["validation accuracy",
                                  "milliseconds per image (ONNX Runtime, CPU)"]
    complete = study.get_trials(states=(State.COMPLETE,))
    assert complete
    for trial in complete:
        measured = trial.user_attrs["costs"]
        assert trial.values[1] == measured["latency_ms"] > 0 and measured["latency_64_ms"] > 0
        assert measured["latency_on"].startswith("ONNX Runtime ")
        assert costs.cpu_name() in measured["latency_on"]
    outcome = run_final(study, cfg, opened, dataset)
    directory = tmp_path / "runs" / study.study_name
    # the front and the reference nets timed again by the final step, one after another
    for each in outcome.front:
        info = json.loads((each.directory / "model.json").read_text())
        assert info["costs"]["latency_ms"] > 0
    assert all(c.latency_ms > 0 for c in outcome.config_costs.values())
    report = (directory / "report.md").read_text(encoding="utf-8")
    assert "accuracy against milliseconds per image (ONNX Runtime, CPU)" in report
    assert "latency as searched, ms per image (batch 1)" in report
    # the same study resumed with latency in PyTorch would mix two runtimes on one axis
    with pytest.raises(ConfigError, match="pick another --study-name"):
        search(RunConfig(**{**cfg.__dict__, "latency_runtime": "pytorch"}))
