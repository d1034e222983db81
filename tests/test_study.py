"""Trials end to end on every storage backend: references, pruning, divergence, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import uuid

import optuna
import pytest
import torch
from torch import nn

import storage
from search.config import RunConfig, trial_seed
from search.errors import ConfigError
from search.objective import TRIAL_FAILURES, Objective
from search.registry import STUDIES, Built
from search.run import search
from search.study import open_study
from spaces import mlp as mlp_space
from tests.conftest import on_meta

TrialState = optuna.trial.TrialState


def _cfg(storage_url, study_name, **overrides):
    values = dict(study="mlp", data="digits", n_trials=3, epochs=2, storage=storage_url,
                  study_name=study_name, final=False)
    values.update(overrides)
    return RunConfig(**values)


def test_new_study_runs_references_first_then_resumes(storage_url, study_name):
    first, _, _ = search(_cfg(storage_url, study_name, n_trials=3, references="full"))
    trials = first.get_trials()
    assert len(trials) == 3
    assert [t.user_attrs.get("reference") for t in trials[:2]] == ["lecture", "seed"]
    assert trials[0].params == STUDIES["mlp"].to_trial_params(STUDIES["mlp"].references["lecture"])
    assert all(t.state == TrialState.COMPLETE for t in trials[:2])
    attrs = first.user_attrs
    assert attrs["data"]["dataset"] == "digits" and attrs["space_version"] == mlp_space.VERSION
    assert 0 < attrs["data"]["mean"] < 1 and "torch" in attrs["versions"]
    assert first.metric_names == ["validation accuracy"]
    assert trials[0].user_attrs["seed"] == trial_seed(0, 0)
    assert sorted(trials[0].intermediate_values) == [1, 2]  # val accuracy every epoch

    again, _, _ = search(_cfg(storage_url, study_name, n_trials=2))
    trials = again.get_trials()
    assert len(trials) == 5  # resumed and added; references not enqueued twice
    assert sum(1 for t in trials if t.user_attrs.get("reference")) == 2


def test_references_are_pruned_like_any_trial_or_skipped(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    # successive halving keeps trial 1 only if it beats trial 0 after epoch 1: the seed net
    # (dropout 0.3) does not on digits, so it is pruned there, reference or not
    pruned, _, _ = search(_cfg(url, "prunable", n_trials=2, epochs=3, pruner="sha",
                               references="prunable"))
    seed_net = pruned.trials[1]
    assert seed_net.user_attrs["reference"] == "seed"
    assert seed_net.state == TrialState.PRUNED and sorted(seed_net.intermediate_values) == [1]
    full, _, _ = search(_cfg(url, "full", n_trials=2, epochs=3, pruner="sha",
                             references="full"))
    assert [t.state for t in full.trials] == [TrialState.COMPLETE] * 2
    assert full.trials[1].intermediate_values[1] == seed_net.intermediate_values[1]
    skipped, _, _ = search(_cfg(url, "skip", n_trials=2, epochs=1, references="skip"))
    assert len(skipped.trials) == 2
    assert not any("reference" in t.user_attrs for t in skipped.trials)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_resuming_does_not_replay_the_same_trials(tmp_path, sampler):
    url = f"sqlite:///{tmp_path / 's.db'}"
    for _ in range(2):
        study, _, _ = search(_cfg(url, "replay", n_trials=3, epochs=1, sampler=sampler))
    sampled = [t.params for t in study.get_trials() if "reference" not in t.user_attrs]
    assert len(sampled) == 6  # the mlp study does not search its references by default
    assert all(a != b for i, a in enumerate(sampled) for b in sampled[i + 1:])


def test_resume_on_other_data_is_refused(storage_url, study_name):
    search(_cfg(storage_url, study_name, n_trials=1, epochs=1))
    with pytest.raises(ConfigError, match="was made on digits"):
        search(_cfg(storage_url, study_name, data="mnist-5k", n_trials=1, epochs=1))


def _objective_study(storage_url, study_name, digits, pruner, spec=STUDIES["mlp"]):
    cfg = _cfg(storage_url, study_name, epochs=3)
    study = open_study(cfg, spec, digits, storage.open(storage_url), study_name)
    study.pruner = pruner
    return study, Objective(spec, digits, cfg, torch.device("cpu"))


def test_pruning_spares_reference_trials(storage_url, study_name, digits):
    # a pruner that prunes everything it is asked about: only references may complete
    study, objective = _objective_study(storage_url, study_name, digits,
                                        optuna.pruners.ThresholdPruner(lower=1.01))
    study.optimize(objective, n_trials=5)
    states = [t.state for t in study.get_trials()]
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert states[2:] == [TrialState.PRUNED] * 3
    assert all(len(t.intermediate_values) == 1 for t in study.get_trials()[2:])


class _NaNLoss(nn.Module):
    def forward(self, scores, target):
        return nn.functional.cross_entropy(scores, target) * float("nan")


def test_diverging_trial_is_pruned_with_reason_and_study_goes_on(storage_url, study_name, digits):
    spec = STUDIES["mlp"]

    def build(params, *args):
        built = spec.build(params, *args)
        if params.pair == "gelu_margin":  # this pair "diverges" in this test
            return Built(built.model, _NaNLoss(), built.make_optimizer)
        return built

    nan_spec = dataclasses.replace(spec, build=build)
    study, objective = _objective_study(storage_url, study_name, digits,
                                        optuna.pruners.NopPruner(), spec=nan_spec)
    params = dataclasses.replace(spec.references["lecture"], pair="gelu_margin")
    study.enqueue_trial(spec.to_trial_params(params))
    study.optimize(objective, n_trials=4)
    trials = study.get_trials()
    assert len(trials) == 4
    diverged = trials[2]
    assert diverged.state == TrialState.PRUNED
    assert "became nan" in diverged.user_attrs["failure"]
    assert trials[3].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert study.best_value > 0.5


class _Forbidden:
    """Stands in for the test split: any use of it inside a trial fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a trial read the test split ({name})")

    def __len__(self):
        raise AssertionError("a trial read the test split (len)")


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_trials_never_read_the_test_split(tmp_path, digits, name):
    blind = dataclasses.replace(digits, test=_Forbidden())
    cfg = _cfg(f"sqlite:///{tmp_path / 's.db'}", "blind", epochs=2, study=name,
               weights="none")
    # the study records the test split's size; the trials must not touch it at all
    study = open_study(cfg, STUDIES[name], digits, storage.open(cfg.storage), "blind")
    study.optimize(Objective(STUDIES[name], blind, cfg, torch.device("cpu")), n_trials=3)
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials()[:2])


class _OutOfMemory(nn.Module):
    def forward(self, x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_fails_the_trial_and_study_goes_on(storage_url, study_name, digits):
    spec = STUDIES["mlp"]

    pairs = []

    def build(params, *args):
        built = spec.build(params, *args)
        if on_meta():
            return built
        pairs.append(params.pair)
        if len(pairs) == 3:  # trial 2, the enqueued one
            assert params.pair == "gelu_margin"
            return Built(_OutOfMemory(), built.loss_fn, lambda m, fused=False: torch.optim.SGD(
                [torch.zeros(1, requires_grad=True)], lr=0.1))
        return built

    study, objective = _objective_study(storage_url, study_name, digits,
                                        optuna.pruners.NopPruner(),
                                        spec=dataclasses.replace(spec, build=build))
    params = dataclasses.replace(spec.references["lecture"], pair="gelu_margin")
    study.enqueue_trial(spec.to_trial_params(params))
    study.optimize(objective, n_trials=4, catch=TRIAL_FAILURES)
    trials = study.get_trials()
    assert trials[2].state == TrialState.FAIL
    assert trials[2].user_attrs["failure"].startswith("out of memory: CUDA out of memory")
    assert trials[3].state == TrialState.COMPLETE


class _MovesOutOfMemory(nn.Linear):
    """A model whose move to the device runs out of memory."""

    def to(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("point", ["build", "move", "features", "training"])
def test_out_of_memory_anywhere_in_a_trial_fails_it_frees_and_the_study_goes_on(
        tmp_path, digits, monkeypatch, point):
    """torch.OutOfMemoryError while building the model, moving it or a frozen backbone's
    features to the device, or training: the trial fails with one reason, memory is freed
    once the exception (and the model it held) is gone, and the next trial completes."""
    import weakref

    from search import objective as objective_module

    spec = STUDIES["mlp"]
    models, freed, trials_seen = [], [], []

    def build(params, *args):
        built = spec.build(params, *args)
        if on_meta():
            return built
        if len(trials_seen) == 3:  # the third trial's
            if point == "build":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            if point == "move":
                built = Built(_MovesOutOfMemory(4, 4), built.loss_fn, built.make_optimizer)
            if point == "training":
                built = Built(_OutOfMemory(), built.loss_fn, lambda m, fused=False:
                              torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        models.append(weakref.ref(built.model))
        return built

    real_inputs = Objective._inputs

    def inputs(self, params):  # called once per trial, before the build
        trials_seen.append(params)
        if point == "features" and len(trials_seen) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (features to the device)")
        return real_inputs(self, params)

    def free(device):
        real_free(device)
        freed.append([ref() is None for ref in models[2:]])  # after gc.collect

    real_free = objective_module.free_memory
    monkeypatch.setattr(objective_module, "free_memory", free)
    monkeypatch.setattr(Objective, "_inputs", inputs)
    study, objective = _objective_study(f"sqlite:///{tmp_path / 's.db'}", "oom", digits,
                                        optuna.pruners.NopPruner(),
                                        spec=dataclasses.replace(spec, build=build))
    study.optimize(objective, n_trials=4, catch=TRIAL_FAILURES)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE,
                                         TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].user_attrs["failure"].startswith("out of memory: CUDA out of memory")
    assert trials[2].params  # its params were written all the same
    # freed once, after the failed trial's model could be collected
    assert freed == ([[True]] if point in ("move", "training") else [[]])


def test_other_errors_are_not_swallowed(tmp_path, digits):
    spec = STUDIES["mlp"]

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def build(params, *args):
        built = spec.build(params, *args)
        return Built(Broken(), built.loss_fn, lambda m, fused=False: torch.optim.SGD(
            [torch.zeros(1, requires_grad=True)], lr=0.1))

    study, objective = _objective_study(f"sqlite:///{tmp_path / 's.db'}", "broken", digits,
                                        optuna.pruners.NopPruner(),
                                        spec=dataclasses.replace(spec, build=build))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        study.optimize(objective, n_trials=1, catch=TRIAL_FAILURES)


def _rungs_study(pruner, backend: str, name: str, tmp_path):
    """A new study named `name` for the rung tests (Hyperband's brackets depend on the
    name), in memory or in an SQLite file opened as the service opens it."""
    if backend == "memory":
        opened = None
    else:
        opened = storage.open(f"sqlite:///{tmp_path / 'rungs.db'}")
        with contextlib.suppress(KeyError):  # the other run's
            optuna.delete_study(study_name=name, storage=opened)
    return optuna.create_study(storage=opened, direction="maximize", study_name=name,
                               sampler=optuna.samplers.RandomSampler(seed=0), pruner=pruner)


@pytest.mark.parametrize(("name", "backend"), [
    ("sha", "memory"), ("sha", "sqlite"), ("hyperband", "memory")])
def test_pruners_asked_only_at_their_rungs_prune_the_same_trials(name, backend, tmp_path):
    """search.study.AtRungs skips the epochs where successive halving cannot prune: the
    same trials are pruned at the same epochs, with the same rung marks, as by the pruner
    asked at every epoch, in memory and on the service's SQLite storage; successive halving
    gets a trial's marks without reading them back from the storage."""
    import random

    from search.study import make_pruner

    def run(pruner) -> list[tuple]:
        rng = random.Random(7)
        study = _rungs_study(pruner, backend, name_of_study, tmp_path)
        real = study._storage.get_trial_system_attrs

        def read(trial_id):
            reads.append(trial_id)
            return real(trial_id)

        study._storage.get_trial_system_attrs = read

        def objective(trial):
            final, value = rng.random(), 0.0
            for epoch in range(1, 21):
                value = final * (1 - 0.7 ** epoch) + rng.gauss(0, 0.02)
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return value
        study.optimize(objective, n_trials=40)
        return [(t.state, t.last_step, t.system_attrs) for t in study.trials]

    name_of_study = f"rungs-{uuid.uuid4().hex[:12]}"
    reads: list[int] = []
    ours = run(make_pruner(name, 20))
    assert (not reads) if name == "sha" else reads
    reads.clear()
    inner = run(make_pruner(name, 20).inner)
    assert reads
    assert ours == inner
    assert sum(state == TrialState.PRUNED for state, _, _ in ours) >= 10
    assert {step for state, step, _ in ours if state == TrialState.PRUNED} <= {1, 3, 9}
    assert any("completed_rung_1" in marks for _, _, marks in ours)


def _count_commits(engine) -> list:
    from sqlalchemy import event

    commits = []
    event.listen(engine, "commit", lambda connection: commits.append(1))
    return commits


@pytest.mark.parametrize("pruner", ["sha", "none"])
def test_a_trial_writes_its_reports_in_a_few_transactions_and_loses_none(
        storage_url, study_name, digits, pruner, monkeypatch):
    """search.objective.TrialRecorder: every epoch's report reaches the storage, and the
    pruner sees the reports it is asked about, in far fewer commits than one per report and
    attribute."""
    from search import objective as objective_module
    from search.study import make_pruner

    def one_trial(name: str) -> tuple[optuna.trial.FrozenTrial, int]:
        cfg = _cfg(storage_url, name, epochs=12)
        opened = storage.open(storage_url)
        study = open_study(cfg, STUDIES["mlp"], digits, opened, name)
        study.pruner = make_pruner(pruner, 12)
        objective = Objective(STUDIES["mlp"], digits, cfg, torch.device("cpu"))
        commits = _count_commits(opened.engine)
        study.optimize(objective, n_trials=1)  # the lecture net (enqueued first), not pruned
        return study.get_trials()[0], len(commits)

    # the clock driven, not raced: no write falls due by time (a slow machine's epochs
    # would otherwise pass REPORT_EVERY_S and write more often)
    monkeypatch.setattr(objective_module, "REPORT_EVERY_S", float("inf"))
    ours, commits = one_trial(study_name)

    def one_by_one(trial, user_attrs, reports):  # what set_user_attr and report each cost
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        for step, value in sorted(reports.items()):
            trial.report(value, step)

    monkeypatch.setattr(objective_module.storage, "write_trial", one_by_one)
    theirs, separate = one_trial(study_name + "-separate")
    for trial in (ours, theirs):
        assert trial.state == TrialState.COMPLETE
        assert sorted(trial.intermediate_values) == list(range(1, 13))
        assert trial.value == max(trial.intermediate_values.values())
    assert ours.intermediate_values == theirs.intermediate_values
    assert ours.user_attrs.keys() == theirs.user_attrs.keys() >= {
        "seed", "settings", "speed", "threads", "n_parameters", "seconds_per_epoch",
        "epoch_ended", "best_epoch", "worker"}
    # 12 reports and 9 attributes: 21 commits one by one; with no write due by time, only
    # the start, the rungs (1, 3, 9 with sha) and the end write
    assert separate - commits >= 21 - 6, (commits, separate)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() outside optimize
def test_write_trial_is_one_transaction_and_the_trial_sees_what_it_wrote(storage_url,
                                                                         study_name):
    opened = storage.open(storage_url)
    study = optuna.create_study(storage=opened, study_name=study_name)
    trial = study.ask()
    commits = _count_commits(opened.engine)
    storage.write_trial(trial, {"a": 1, "b": [2, 3]}, {1: 0.5, 2: 0.75})
    assert len(commits) == 1
    assert trial.user_attrs == {"a": 1, "b": [2, 3]}
    storage.write_trial(trial, {}, {2: 0.9, 3: 0.8})  # a repeated step is ignored, as report()
    stored = study.get_trials()[0]
    assert stored.user_attrs == {"a": 1, "b": [2, 3]}
    assert stored.intermediate_values == {1: 0.5, 2: 0.75, 3: 0.8}
    fixed = optuna.trial.FixedTrial({})  # no storage: one by one through its own methods
    storage.write_trial(fixed, {"c": 4}, {1: 0.5})
    assert fixed.user_attrs == {"c": 4}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() outside optimize
def test_params_wait_for_the_next_write_and_are_never_lost(storage_url, study_name):
    """storage.params_later: a trial's suggested params reach the database in the
    transaction of its next write_trial, with its attributes (one commit, not one each),
    exactly as Optuna stores them; anything else that uses the storage first writes them;
    a block left by an exception writes them at its end; a param that contradicts the
    study's earlier ones is refused as Optuna refuses it."""
    opened = storage.open(storage_url)
    # a sampler that reads nothing: Optuna commits after a read too
    study = optuna.create_study(storage=opened, study_name=study_name,
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def suggest(trial) -> dict:
        return {"x": trial.suggest_float("x", 0.001, 1.0, log=True),
                "n": trial.suggest_int("n", 16, 512, log=True),
                "act": trial.suggest_categorical("act", ["relu", "gelu"])}

    for _ in range(2):  # the second knows the distributions from the first (no query)
        trial = study.ask()
        commits = _count_commits(opened.engine)
        with storage.params_later(trial):
            params = suggest(trial)
            assert len(commits) == 0
            storage.write_trial(trial, {"a": 1}, {1: float("nan")})
        assert len(commits) == 1
        storage.write_trial(trial, {"a": 2})  # an attribute written again is replaced
        stored = study.get_trials()[-1]
        assert stored.params == params == trial.params
        assert stored.distributions == trial.distributions
        assert stored.user_attrs == {"a": 2}
        assert math.isnan(stored.intermediate_values[1])
        study.tell(trial, 0.5)
    trial = study.ask()
    with storage.params_later(trial):
        params = suggest(trial)
        trial.set_user_attr("b", 3)  # another use of the storage: the params first
        assert study.get_trials()[-1].params == params
    trial = study.ask()
    with pytest.raises(KeyError), storage.params_later(trial):
        params = suggest(trial)
        raise KeyError("the trial ends before its first write")
    assert study.get_trials()[-1].params == params
    study.tell(trial, state=TrialState.FAIL)
    trial = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution"), \
            storage.params_later(trial):
        trial.suggest_categorical("x", ["a", "b"])
        storage.write_trial(trial, {"c": 1})


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() outside optimize
@pytest.mark.parametrize("every", [float("inf"), 0.0])
def test_reports_wait_for_a_rung_or_for_the_time_that_makes_them_due(monkeypatch, every):
    """TrialRecorder writes at the pruner's rungs (1, 3, 9), and between them once
    REPORT_EVERY_S has passed since its last write: the clock set, not raced."""
    from search import objective as objective_module
    from search.study import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("sha", 12))
    writes: list[dict] = []
    monkeypatch.setattr(objective_module.storage, "write_trial",
                        lambda trial, attrs, reports: writes.append(dict(reports)))
    monkeypatch.setattr(objective_module, "REPORT_EVERY_S", every)
    recorder = objective_module.TrialRecorder(study.ask())
    for step in range(1, 6):
        recorder.report(0.5 + step / 100, step)
    if every == 0.0:  # always due: each report as it comes
        assert [sorted(w) for w in writes] == [[1], [2], [3], [4], [5]]
    else:  # never due by time: the rungs only, the rest waits for the trial's end
        assert [sorted(w) for w in writes] == [[1], [2, 3]]
        assert sorted(recorder.pending) == [4, 5]
