"""The mlp search space, exercised with FixedTrial and a real sampler."""

from __future__ import annotations

import optuna
import pytest

from search.models import DROPOUT_PLACEMENTS, PAIRS
from search.registry import STUDIES
from spaces import mlp


@pytest.mark.parametrize("name", sorted(mlp.REFERENCES))
def test_reference_configs_round_trip_through_fixed_trial(name):
    params = mlp.REFERENCES[name]
    assert mlp.suggest(optuna.trial.FixedTrial(mlp.to_trial_params(params))) == params


def test_reference_configs_are_the_exercise_nets():
    assert len(mlp.LECTURE.widths) == 2 and mlp.LECTURE.dropout == "none"
    assert len(mlp.SEED.widths) == 3
    assert (mlp.SEED.dropout, mlp.SEED.dropout_rate) == ("input", 0.3)
    assert mlp.SEED.pair != mlp.LECTURE.pair


def test_fixed_trial_builds_widths_array_and_conditional_params():
    params = mlp.suggest(optuna.trial.FixedTrial({
        "n_layers": 3, "n_units_l0": 200, "n_units_l1": 100, "n_units_l2": 50,
        "dropout": "none", "pair": "gelu_margin", "optimizer": "sgd", "sgd_lr": 0.05,
    }))
    assert params.widths == (200, 100, 50)
    assert params.dropout_rate == 0.0 and params.lr == 0.05 and params.optimizer == "sgd"


def test_sampled_params_stay_in_the_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_layers, seen_placements, seen_pairs = set(), set(), set()
    for _ in range(200):
        trial = study.ask()
        p = mlp.suggest(trial)
        study.tell(trial, 0.0)
        assert 1 <= len(p.widths) <= mlp.MAX_LAYERS
        assert all(mlp.WIDTH_RANGE[0] <= w <= mlp.WIDTH_RANGE[1] for w in p.widths)
        low, high = mlp.LR_RANGES[p.optimizer]
        assert low <= p.lr <= high
        # a conditional parameter is named after its parent and only present with it
        assert (f"{p.optimizer}_lr" in trial.params) and len(
            [k for k in trial.params if k.endswith("_lr")]) == 1
        assert ("dropout_rate" in trial.params) == (p.dropout != "none")
        seen_layers.add(len(p.widths))
        seen_placements.add(p.dropout)
        seen_pairs.add(p.pair)
    assert seen_layers == set(range(1, mlp.MAX_LAYERS + 1))
    assert seen_placements == set(DROPOUT_PLACEMENTS)
    assert seen_pairs == set(mlp.PAIRS)


def test_every_pair_in_the_space_can_be_built():
    assert set(mlp.PAIRS) <= set(PAIRS) and len(mlp.PAIRS) >= 4


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_registry_specs_build_their_references(name):
    spec = STUDIES[name]
    assert spec.references, "every study enqueues at least one reference config"
    for params in spec.references.values():
        built = spec.build(params, (1, 28, 28), 10, 0.13, 0.31)
        optimizer = built.make_optimizer(built.model)
        assert optimizer.param_groups[0]["lr"] == params.lr
