"""RunConfig: everything `python -m search.run` was asked to do, resolved in one dataclass.

argparse lives in search/run.py only; everything downstream reads this. It is saved in the
study's user attributes so a study says how it was made.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

from search.errors import ConfigError

SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("hyperband", "median", "none")


@dataclass(frozen=True)
class RunConfig:
    study: str
    data: str = "auto"
    data_dir: str | None = None
    n_trials: int = 20
    timeout: float | None = None  # seconds for the search, across its trials
    epochs: int = 20  # per trial, and the maximum resource of the Hyperband pruner
    batch_size: int = 128  # fixed, not tuned: it is not a validation-score knob
    storage: str = "sqlite:///studies.db"
    study_name: str | None = None  # None: "<study>-<dataset>"
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # processes running trials; None: one per GPU, else one
    sampler: str = "tpe"
    pruner: str = "hyperband"
    final: bool = True
    final_seeds: int = 3
    runs_dir: str = "runs"  # final models and reports go to <runs_dir>/<study-name>/
    artifact_dir: str | None = None  # None: beside the SQLite file, else ./artifacts
    cache_dir: str | None = None  # None: beside the SQLite file (studies-cache/), else ./cache
    weights: str = "imagenet"  # vgg16: imagenet, none (seeded random) or a state_dict path
    input_size: int = 32  # vgg16: images are resized to this square size (at least 32)

    def __post_init__(self) -> None:
        positive = {"--n-trials": self.n_trials, "--epochs": self.epochs,
                    "--batch-size": self.batch_size, "--final-seeds": self.final_seeds}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"--timeout must be positive (seconds), got {self.timeout}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if self.input_size < 32:
            raise ConfigError(f"--input-size must be at least 32 (VGG16 halves it five "
                              f"times), got {self.input_size}")
        if self.study_name is not None and not self.study_name.strip():
            raise ConfigError("--study-name must not be empty")

    def to_dict(self) -> dict:
        """For the study's user attributes: the storage URL's password is hidden."""
        import storage

        return {**asdict(self), "storage": storage.shown(self.storage)}


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A trial's seed: distinct per trial, reproducible from the study seed."""
    return (study_seed * 1_000_003 + trial_number) % (2**31 - 1)


def versions() -> dict[str, str]:
    """Library versions a study or model depends on."""
    import numpy
    import optuna
    import sklearn
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "optuna": optuna.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }
