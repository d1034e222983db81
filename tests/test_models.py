"""The MLP builder: widths array, each dropout placement, each activation/loss pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.models import (
    CNN,
    DROPOUT_PLACEMENTS,
    MLP,
    PAIRS,
    POOL_AT,
    POOLS,
    Normalize,
    count_parameters,
)


def linear_sizes(model: MLP) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("widths", [(64,), (128, 64, 32), (300, 200, 100, 50)])
def test_widths_array_sets_hidden_layers(widths):
    model = MLP(784, widths, 10)
    sizes = linear_sizes(model)
    assert len(sizes) == len(widths) + 1
    assert [out for _, out in sizes] == [*widths, 10]
    assert sizes[0][0] == 784


def _kinds(model: MLP) -> list[str]:
    return [type(m).__name__ for m in model.net]


@pytest.mark.parametrize("placement", DROPOUT_PLACEMENTS)
def test_dropout_placement(placement):
    model = MLP(784, (32, 16, 8), 10, dropout=placement, dropout_rate=0.3)
    kinds = _kinds(model)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    expected = {"none": 0, "input": 1, "hidden": 3, "both": 4}[placement]
    assert len(dropouts) == expected
    assert all(d.p == 0.3 for d in dropouts)
    first_linear = kinds.index("Linear")
    # "before the first hidden layer" means between flattening and the first Linear
    assert (kinds[first_linear - 1] == "Dropout") == (placement in ("input", "both"))


def test_seed_net_shape():
    """The exercise's net: three hidden layers, dropout 0.3 before the first one only."""
    model = MLP(784, (512, 256, 128), 10, activation="leaky_relu", dropout="input",
                dropout_rate=0.3, output="log_softmax")
    assert _kinds(model) == ["Normalize", "Flatten", "Dropout", "Linear", "LeakyReLU",
                             "Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear",
                             "LogSoftmax"]


@pytest.mark.parametrize("pair_name", sorted(PAIRS))
def test_each_pair_trains_a_step(pair_name):
    pair = PAIRS[pair_name]
    torch.manual_seed(0)
    model = MLP(64, (32,), 10, activation=pair.activation, output=pair.output)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    scores = model(x)
    assert scores.shape == (16, 10)
    if pair.output == "log_softmax":  # NLL needs log-probabilities
        assert torch.allclose(scores.exp().sum(1), torch.ones(16), atol=1e-5)
    loss = pair.make_loss()(scores, y)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pairs_use_distinct_activations():
    acts = {p.activation for p in PAIRS.values()}
    assert len(acts) == len(PAIRS) >= 4


def test_normalize_is_in_state_dict():
    model = MLP(64, (8,), 10, mean=0.25, std=0.5)
    state = model.state_dict()
    assert float(state["net.0.mean"]) == 0.25 and float(state["net.0.std"]) == 0.5
    assert torch.allclose(Normalize(0.25, 0.5)(torch.tensor([0.75])), torch.tensor([1.0]))


def test_count_parameters():
    assert count_parameters(MLP(4, (3,), 2)) == 4 * 3 + 3 + 3 * 2 + 2


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": ()}, "non-empty"),
    ({"widths": (0,)}, "positive"),
    ({"widths": (8,), "dropout": "everywhere"}, "placement"),
    ({"widths": (8,), "activation": "swish"}, "activation"),
    ({"widths": (8,), "output": "softmax"}, "output"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(64, n_classes=10, **kwargs)


# --- CNN -------------------------------------------------------------------------------


def test_lecture_cnn_is_pytorchs_mnist_example():
    """Two 3x3 convs 32 and 64, one max pool, dropout 0.25 / 0.5, a 128-unit head: the
    example's 1,199,882 parameters."""
    model = CNN((1, 28, 28), (32, 64), 10, kernel=3, padding="valid", pool="max",
                pool_at="last", dropout="both", conv_dropout_rate=0.25, head_dropout_rate=0.5)
    assert [type(m).__name__ for m in model.net] == [
        "Normalize", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Dropout",
        "Linear", "ReLU", "Dropout", "Linear"]
    assert count_parameters(model) == 1_199_882
    assert model.feature_shape == (64, 12, 12)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("pool_at", POOL_AT)
def test_cnn_channels_array_and_pooling(pool, pool_at):
    model = CNN((1, 28, 28), (8, 16, 32), 10, pool=pool, pool_at=pool_at, batch_norm=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    # pooling halves (rounding down); a stride-2 3x3 conv with padding 1 rounds up: 7 -> 4
    side = {"each": 4 if pool == "stride" else 3, "last": 14}[pool_at]
    assert model.feature_shape == (32, side, side)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_cnn_pooling_stops_at_one_pixel():
    model = CNN((1, 8, 8), (4, 4, 4, 4, 4), 3, pool="max")
    assert model.feature_shape == (4, 1, 1) and model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("size", [8, 28])
def test_valid_padding_never_runs_out_of_pixels(size):
    model = CNN((1, size, size), (4, 4, 4, 4), 10, kernel=5, padding="valid")
    assert model(torch.rand(2, 1, size, size)).shape == (2, 10)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.padding == (0, 0)  # valid where the map is large enough


def test_cnn_per_channel_normalization_buffers():
    model = CNN((3, 16, 16), (4,), 5, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    assert model.net[0].mean.shape == (3, 1, 1)
    assert torch.allclose(model.net[0](torch.full((1, 3, 2, 2), 0.6))[0, :, 0, 0],
                          torch.tensor([1.0, 0.8, 0.6]))


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": ()}, "non-empty"),
    ({"channels": (8,), "pool": "median"}, "pool"),
    ({"channels": (8,), "kernel": 4}, "kernel must be odd"),
])
def test_bad_cnn_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CNN((1, 8, 8), n_classes=10, **kwargs)
