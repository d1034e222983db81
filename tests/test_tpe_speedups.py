"""search.tpe_speedups: each change to Optuna's TPE draws what Optuna draws, and is left out,
with Optuna's own code in place, when Optuna's function no longer matches it."""

from __future__ import annotations

import logging

import numpy as np
import optuna
import pytest
from optuna.samplers._tpe import _truncnorm
from optuna.samplers._tpe import sampler as tpe

from search import tpe_speedups
from search.study import TrialSeeded, make_sampler
from spaces import mlp as mlp_space

TrialState = optuna.trial.TrialState


def _draws(seed: int, n_trials: int = 40) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed))
    # a score that depends on every parameter, so the later proposals do too
    study.optimize(lambda t: (sum(mlp_space.suggest(t).widths) % 97) / 97
                   + t.params.get("dropout_rate", 0), n_trials=n_trials)
    return [t.params for t in study.trials]


def _same_draws(theirs: list[dict], ours: list[dict]) -> None:
    """The same choices; a float may differ in its last bits (scipy's and Optuna's log Phi
    differ by up to 1e-15 absolute)."""
    assert [t.keys() for t in theirs] == [o.keys() for o in ours]
    for t, o in zip(theirs, ours, strict=True):
        assert {k: v for k, v in t.items() if not isinstance(v, float)} == {
            k: v for k, v in o.items() if not isinstance(v, float)}
        assert [t[k] for k in t if isinstance(t[k], float)] == pytest.approx(
            [o[k] for k in o if isinstance(o[k], float)], rel=1e-9)


def test_every_change_applies_on_the_optuna_ci_pins():
    """On the Optuna release .ci/constraints.txt pins, all four changes prove equal and are
    applied (on an older one some may step aside: test_a_change_steps_aside_...)."""
    status = tpe_speedups.install()
    assert set(status) == set(tpe_speedups.CHANGES)
    if optuna.__version__ == _pinned("optuna"):
        assert status == dict.fromkeys(tpe_speedups.CHANGES)
    if status["log_ndtr"] is None:
        from scipy.special import log_ndtr

        assert _truncnorm._log_ndtr is log_ndtr


def _pinned(name: str) -> str | None:
    from pathlib import Path

    pins = Path(__file__).parents[1] / ".ci" / "constraints.txt"
    for line in pins.read_text(encoding="utf-8").split():
        if line.startswith(f"{name}=="):
            return line.split("==")[1]
    return None


def test_tpe_draws_the_same_as_optuna_as_shipped():
    """A seeded TPE study over the mlp space proposes with the changes what it proposes with
    Optuna's TPE as it ships (search.tpe_speedups.as_shipped)."""
    ours = _draws(3)
    with tpe_speedups.as_shipped():
        assert _truncnorm._log_ndtr.__module__.startswith("optuna")
        theirs = _draws(3)
    _same_draws(theirs, ours)


def _reinstalled(caplog) -> dict:
    """install() run again on what Optuna has now (inside as_shipped: Optuna's own code,
    unless a test patched it), with its debug lines in caplog."""
    tpe_speedups._status = None  # as_shipped puts the status back as it found it
    with caplog.at_level(logging.DEBUG, logger="search.tpe_speedups"):
        return tpe_speedups.install()


def test_a_change_steps_aside_when_optunas_signature_differs(monkeypatch, caplog):
    def other_split(study, trials, n_below, constraints_enabled, extra):  # a future release
        raise AssertionError("not called by the check")

    outside = dict(tpe_speedups.install())
    with tpe_speedups.as_shipped(), monkeypatch.context() as patched:
        patched.setattr(tpe, "_split_trials", other_split)
        status = _reinstalled(caplog)
        assert tpe._split_trials is other_split  # Optuna's own left in place
        assert "_split_trials takes ('study', 'trials', 'n_below', 'constraints_enabled', " \
               "'extra')" in status["split_once"]
        assert {**status, "split_once": None} == {**outside, "split_once": None}
    lines = [r.getMessage() for r in caplog.records if "split_once" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("TPE speed-up 'split_once' left out")
    assert tpe._split_trials is not other_split


def test_a_change_steps_aside_when_its_answer_differs(monkeypatch, caplog):
    """Optuna's function with the same signature but another answer (a release that changed
    what it computes) keeps Optuna's: scipy's log Phi is not put in its place."""
    def shifted(a):
        return np.log(0.5 + 0.0 * np.asarray(a, dtype=float))

    def params_of_running_trials_differently(self, trials, search_space, study):
        values = {name: [] for name in search_space}
        for trial in trials:  # every trial, even one that lacks a param
            for name, distribution in search_space.items():
                values[name].append(distribution.to_internal_repr(
                    trial.params.get(name, distribution.to_external_repr(0))))
        return {name: np.asarray(v) for name, v in values.items()}

    outside = dict(tpe_speedups.install())
    with tpe_speedups.as_shipped(), monkeypatch.context() as patched:
        patched.setattr(_truncnorm, "_log_ndtr", shifted)
        patched.setattr(tpe.TPESampler, "_get_internal_repr",
                        params_of_running_trials_differently)
        status = _reinstalled(caplog)
        assert _truncnorm._log_ndtr is shifted
        assert tpe.TPESampler._get_internal_repr is params_of_running_trials_differently
        assert "differs from Optuna's _log_ndtr" in status["log_ndtr"]
        if outside["param_columns"] is None:  # Optuna's _get_params as written against
            assert "its arrays differ from Optuna's" in status["param_columns"]
        assert status["split_once"] is outside["split_once"] is None


def test_the_trials_are_read_once_when_study_get_trials_changed(monkeypatch, caplog):
    """A Study._get_trials of another signature: TPE sees the study itself, and the draws
    are Optuna's."""
    real = optuna.Study._get_trials

    def other(self, deepcopy=True, states=None, use_cache=False, newer_than=None):
        return real(self, deepcopy, states, use_cache)

    with tpe_speedups.as_shipped(), monkeypatch.context() as patched:
        patched.setattr(optuna.Study, "_get_trials", other)
        status = _reinstalled(caplog)
        assert "Study._get_trials takes" in status["trials_once"]
        sampler = make_sampler("tpe", 1)
        study = optuna.create_study(sampler=sampler)
        assert sampler._view(study, study.ask()) is study
        theirs = _draws(4, n_trials=15)
    _same_draws(theirs, _draws(4, n_trials=15))


def test_tpe_reads_the_trials_once_per_trial_and_draws_the_same(monkeypatch):
    """TrialSeeded shows TPE the study's trials as read at a trial's first suggestion: one
    storage read and one good/bad split per trial instead of one per parameter, the same
    draws."""

    def draws() -> tuple[list[dict], int]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", 5))
        reads, suggesting = [], []
        real = study._storage.get_all_trials

        def counted(*args, **kwargs):
            if suggesting:
                reads[-1] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(study._storage, "get_all_trials", counted)

        def objective(trial):
            reads.append(0)
            suggesting.append(True)
            params = mlp_space.suggest(trial)
            suggesting.clear()
            return (sum(params.widths) % 89) / 89 + params.dropout_rate
        study.optimize(objective, n_trials=30)
        return [t.params for t in study.trials], max(reads[10:])

    splits = []  # Optuna's split at work, whoever calls it
    split = tpe._split_complete_trials

    def counted_split(*args):
        splits.append(1)
        return split(*args)

    monkeypatch.setattr(tpe, "_split_complete_trials", counted_split)
    ours, most = draws()
    assert most == 1
    ours_splits = len(splits)
    monkeypatch.setattr(TrialSeeded, "_view", lambda self, study, trial: study)
    splits.clear()
    theirs, most = draws()
    assert most >= 5  # the study as Optuna shows it: read again for every parameter
    assert theirs == ours
    # TPE split the trials once per trial (30 trials less its random start), not once per
    # parameter
    assert ours_splits <= 30 and len(splits) >= 3 * ours_splits


@pytest.mark.skipif(not tpe_speedups.applied("param_columns"),
                    reason=f"Optuna {optuna.__version__}: "
                           f"{tpe_speedups.install()['param_columns']}")
def test_tpe_param_columns_equal_optunas_loop():
    """ParamColumns gives TPE the arrays Optuna's _get_internal_repr builds, in the same
    order: finished trials from columns kept across trials (grown as the study grows, a
    param missing where another layer count left it out), running trials (TPE's constant
    liar) as they are at each call, with params they suggested since."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", 0))
    sampler = study.sampler.inner
    columns = tpe_speedups.ParamColumns()

    def optunas(trials, space):  # Optuna's loop, as optuna/samplers/_tpe/sampler.py has it
        values = {name: [] for name in space}
        for trial in trials:
            params = sampler._get_params(trial, study)
            if space.keys() <= params.keys():
                for name, distribution in space.items():
                    values[name].append(distribution.to_internal_repr(params[name]))
        return {name: np.asarray(v) for name, v in values.items()}

    def add(n_trials: int, running: int) -> list:
        for i in range(n_trials):
            trial = study.ask()
            mlp_space.suggest(trial)
            state = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL][i % 3]
            if state == TrialState.PRUNED:
                trial.report(0.5, 1)
            study.tell(trial, 0.5 + i / 100 if state == TrialState.COMPLETE else None,
                       state=state)
        asked = [study.ask() for _ in range(running)]
        for trial in asked:  # running, partly suggested
            trial.suggest_int("n_layers", 1, mlp_space.MAX_LAYERS)
        return asked

    def compare(space) -> None:
        trials = study.get_trials(deepcopy=False,
                                  states=[TrialState.COMPLETE, TrialState.PRUNED,
                                          TrialState.RUNNING])
        expected = optunas(trials, space)
        got = columns.internal_repr(sampler, trials, space, study, groups)
        assert got.keys() == expected.keys()
        for name in space:
            assert got[name].tolist() == expected[name].tolist(), name
        checked.append((len(next(iter(expected.values()))), len(trials)))

    checked: list[int] = []
    groups: dict = {}  # one trial's (TrialsOnce.param_groups)
    running = add(20, running=2)
    distributions = {name: d for t in study.trials for name, d in t.distributions.items()}
    spaces = [{name: distribution} for name, distribution in distributions.items()]
    spaces.append({name: distributions[name] for name in sorted(distributions)[:3]})
    for space in spaces:
        compare(space)
    groups = {}  # the next trial's
    for trial in running:  # the running trials suggest more, finish; others start
        mlp_space.suggest(trial)
        study.tell(trial, 0.9)
    add(45, running=1)
    for space in spaces:
        compare(space)
    assert len(distributions) >= 8 and max(kept for kept, _ in checked) >= 40
    assert any(0 < kept < of for kept, of in checked)  # a param some trials do not have
