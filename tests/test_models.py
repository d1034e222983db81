"""The MLP builder: widths array, each dropout placement, each activation/loss pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.models import DROPOUT_PLACEMENTS, MLP, PAIRS, Normalize, count_parameters


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
