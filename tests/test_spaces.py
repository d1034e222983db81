"""The mlp search space, exercised with FixedTrial and a real sampler."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch

from search.augment import FAMILIES, LEVELS, AugmentSpec
from search.models import CNN_DROPOUT, DROPOUT_PLACEMENTS, PADDINGS, PAIRS, POOL_AT, POOLS
from search.registry import STUDIES
from spaces import cnn, mlp


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
        "schedule": "cosine",
    }))
    assert params.widths == (200, 100, 50)
    assert params.dropout_rate == 0.0 and params.lr == 0.05 and params.optimizer == "sgd"
    assert params.schedule == "cosine"


@pytest.mark.parametrize("schedule", mlp.SCHEDULES)
def test_mlp_schedule_reaches_the_optimizer(schedule):
    from search.registry import build_mlp

    params = dataclasses.replace(mlp.LECTURE, schedule=schedule)
    built = build_mlp(params, (1, 8, 8), 10, 0.1, 0.3)
    optimizer = built.make_optimizer(built.model)
    scheduler = built.make_scheduler(optimizer, 100)
    assert (scheduler is None) == (schedule == "constant")
    for _ in range(50):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    halfway = optimizer.param_groups[0]["lr"]
    assert halfway == pytest.approx(mlp.LECTURE.lr if schedule == "constant"
                                    else mlp.LECTURE.lr / 2, rel=1e-3)


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


# --- cnn -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(cnn.REFERENCES))
def test_cnn_references_round_trip_through_fixed_trial(name):
    params = cnn.REFERENCES[name]
    assert cnn.suggest(optuna.trial.FixedTrial(cnn.to_trial_params(params))) == params


def test_cnn_references_are_the_lecture_and_the_exercise():
    lecture, exercise = cnn.LECTURE, cnn.EXERCISE
    assert lecture.channels == (32, 64) and lecture.head_width == 128
    assert not lecture.augment.active and lecture.normalization == "lecture"
    assert exercise.augment.active and exercise.normalization == "train"
    assert dataclasses.replace(exercise, augment=lecture.augment,
                               normalization="lecture") == lecture


BASE = cnn.to_trial_params(cnn.LECTURE)
CHOICES = [("kernel", k) for k in cnn.KERNELS] + [("padding", p) for p in PADDINGS] + [
    ("batch_norm", b) for b in (False, True)] + [("pool", p) for p in POOLS] + [
    ("pool_at", p) for p in POOL_AT] + [("pair", p) for p in cnn.PAIRS] + [
    ("schedule", s) for s in cnn.SCHEDULES] + [("normalization", n) for n in
                                               cnn.NORMALIZATIONS]


@pytest.mark.parametrize("key, value", CHOICES, ids=[f"{k}={v}" for k, v in CHOICES])
def test_every_cnn_choice_builds_a_model_with_class_scores(key, value):
    params = cnn.suggest(optuna.trial.FixedTrial({**BASE, key: value}))
    built = STUDIES["cnn"].build(params, (1, 28, 28), 10, (0.13,), (0.31,))
    assert built.model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    optimizer = built.make_optimizer(built.model)
    scheduler = built.make_scheduler(optimizer, 10)
    assert (scheduler is None) == (params.schedule == "constant")


@pytest.mark.parametrize("placement", CNN_DROPOUT)
@pytest.mark.parametrize("optimizer", cnn.OPTIMIZERS)
def test_cnn_conditional_params(placement, optimizer):
    flat = {k: v for k, v in BASE.items() if "dropout_rate" not in k and not k.endswith("_lr")}
    flat.update({"dropout": placement, "optimizer": optimizer, f"{optimizer}_lr": 0.01,
                 "conv_dropout_rate": 0.2, "head_dropout_rate": 0.4, "aug_strength": 0.5,
                 **{f"aug_{f}": f in ("blur", "distort") for f in FAMILIES}})
    params = cnn.suggest(optuna.trial.FixedTrial(flat))
    assert params.conv_dropout_rate == (0.2 if placement in ("conv", "both") else 0.0)
    assert params.head_dropout_rate == (0.4 if placement in ("head", "both") else 0.0)
    assert params.lr == 0.01 and params.augment == AugmentSpec(0.5, ("blur", "distort"))
    built = STUDIES["cnn"].build(params, (1, 28, 28), 10, (0.13,), (0.31,))
    assert sum(isinstance(m, torch.nn.Dropout) for m in built.model.modules()) == {
        "none": 0, "conv": 1, "head": 1, "both": 2}[placement]
    assert built.augment == params.augment


@pytest.mark.parametrize("blocks", range(1, cnn.MAX_BLOCKS + 1))
def test_only_shallow_cnns_may_pool_after_the_last_block_alone(blocks):
    flat = {**BASE, "n_blocks": blocks, **{f"channels_b{i}": 16 for i in range(blocks)},
            "pool_at": "last"}
    params = cnn.suggest(optuna.trial.FixedTrial(flat))
    assert params.pool_at == ("last" if blocks <= cnn.MAX_BLOCKS_POOLED_LAST else "each")
    # and the flat params give back the same config
    assert cnn.suggest(optuna.trial.FixedTrial(cnn.to_trial_params(params))) == params
    assert ("pool_at" in cnn.to_trial_params(params)) == (blocks <= cnn.MAX_BLOCKS_POOLED_LAST)


def test_sampled_cnn_params_stay_in_the_space_and_build():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    strengths, blocks = set(), set()
    for _ in range(60):
        trial = study.ask()
        params = cnn.suggest(trial)
        study.tell(trial, 0.0)
        strengths.add(params.augment.strength)
        blocks.add(len(params.channels))
        assert all(cnn.CHANNEL_RANGE[0] <= c <= cnn.CHANNEL_RANGE[1] for c in params.channels)
        assert params.augment.strength in LEVELS
        if params.augment.strength == 0:
            assert params.augment.families == ()
        for size in (8, 28):  # every point of the space fits every input size
            built = STUDIES["cnn"].build(params, (1, size, size), 10, (0.13,), (0.31,))
            assert built.model(torch.rand(2, 1, size, size)).shape == (2, 10)
    assert strengths == set(LEVELS) and blocks == set(range(1, cnn.MAX_BLOCKS + 1))
