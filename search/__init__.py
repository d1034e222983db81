"""Hyperparameter search service: `python -m search.run --study mlp`."""
