"""Model builders: the networks the studies search over, built from frozen params.

The search (`search.objective`) and the final retrain (`search.final`) build every model
through these classes (via `search.registry`), so a model rebuilt from stored params is the
model that was scored. One module per family: mlp.py, cnn.py; common.py holds what they
share (activation/loss pairs, input normalization held as buffers).
"""

from search.models.cnn import CNN, CNN_DROPOUT, PADDINGS, POOL_AT, POOLS
from search.models.common import ACTIVATIONS, PAIRS, Normalize, Pair, count_parameters
from search.models.mlp import DROPOUT_PLACEMENTS, MLP

__all__ = ["ACTIVATIONS", "CNN", "CNN_DROPOUT", "DROPOUT_PLACEMENTS", "MLP", "PADDINGS",
           "PAIRS", "POOLS", "POOL_AT", "Normalize", "Pair", "count_parameters"]
