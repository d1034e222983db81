"""RunConfig: everything `python -m search.run` was asked to do, resolved in one dataclass.

argparse lives in search/run.py only; everything downstream reads this. It is saved in the
study's user attributes so a study says how it was made.
"""

from __future__ import annotations

import math
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from search.errors import ConfigError
from search.images import MAX_SIZE as MAX_IMAGE_SIZE
from search.images import MIN_SIZE as MIN_IMAGE_SIZE

# The choices of --sampler, --pruner and --references, each with what --help says of it
SAMPLERS = {
    "tpe": "Optuna's TPE, each parameter modelled on its own, after 8 random trials",
    "tpe-multivariate": "TPE modelling the parameters jointly, grouped by number of layers "
                        "(slower per trial as the study grows)",
    "random": "independent uniform draws",
    "qmc": "a scrambled Sobol sequence (quasi-random, evenly spread)",
    "nsga2": "Optuna's NSGA-II: a genetic algorithm over generations of 50 trials, made for "
             "several objectives (--objectives)",
    "gp": "Optuna's Gaussian-process sampler over the parameters every trial has (the others "
          "drawn at random), after 8 random trials",
}
PRUNERS = {
    "sha": "asynchronous successive halving: after 1, 3, 9, ... epochs a trial goes on only "
           "if it is in the best third of the trials that reached that epoch",
    "median": "from epoch 3 on, after 5 finished trials, stop a trial below the median",
    "hyperband": "three successive-halving brackets up to --epochs",
    "none": "every trial runs all its epochs",
}
# the study's reference configs during the search (the final step retrains them in full
# whichever is chosen)
REFERENCE_MODES = {
    "full": "enqueued first and run in full",
    "prunable": "enqueued first, pruned like any trial",
    "skip": "not run in the search",
}

# --objectives: validation accuracy first (maximized), then any of these costs (minimized),
# each the name of its metric in the study (optuna-dashboard's axis labels)
COST_OBJECTIVES = {"params": "parameters", "flops": "multiply-adds per image",
                   "latency": "milliseconds per image"}
ACCURACY_METRIC = "validation accuracy"
# --latency-runtime: what a trial's latency is measured in (search.costs.measure_latency)
LATENCY_RUNTIMES = {
    "onnxruntime": "exported to ONNX and run in ONNX Runtime on this machine's CPU, as "
                   "deployed",
    "pytorch": "the PyTorch model on the trial's device (a GPU, or the CPU)",
}
# pruners of a study with several objectives: "sha" there halves among cost peers
PARETO_PRUNERS = ("sha", "none")

TRIAL_SETTINGS = ("epochs", "batch_size", "sampler", "pruner", "seed")

# Upper bounds: far above any real use, low enough that a typo (an extra 000) is caught
# before hours are spent or memory is asked for.
MAX_TRIALS = 100_000
MAX_EPOCHS = 10_000
MAX_LIMIT = 10**11  # --max-params, --max-flops: far above VGG16's 138M and 15.5G
MAX_LATENCY_MS = 60_000.0  # --max-latency-ms: a minute per image
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256
MAX_FINAL_SEEDS = 100
MAX_FRONT_MODELS = 20
MAX_INPUT_SIZE = 1024
MAX_TIMEOUT_S = 30 * 24 * 3600
MAX_SEED = 2**31 - 2  # trial seeds are taken modulo 2**31 - 1
# a study name becomes a folder name under --runs-dir: one path component, no leading dot
STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,99}")


def _BOUNDS(cfg: RunConfig) -> tuple:  # noqa: N802 (a table)
    return (("--n-trials", cfg.n_trials, MAX_TRIALS), ("--max-trials", cfg.max_trials, MAX_TRIALS),
            ("--epochs", cfg.epochs, MAX_EPOCHS),
            ("--batch-size", cfg.batch_size, MAX_BATCH_SIZE),
            ("--workers", cfg.workers, MAX_WORKERS),
            ("--workers-per-device", cfg.workers_per_device, MAX_WORKERS),
            ("--final-seeds", cfg.final_seeds, MAX_FINAL_SEEDS),
            ("--front-models", cfg.front_models, MAX_FRONT_MODELS),
            ("--final-epochs", cfg.final_epochs, MAX_EPOCHS),
            ("--max-params", cfg.max_params, MAX_LIMIT), ("--max-flops", cfg.max_flops, MAX_LIMIT))


# The final retrain trains each config for up to FINAL_EPOCH_FACTOR x the best trial's
# epochs (its cost is paid once, not per trial) and stops after the patience without a better
# validation accuracy, keeping its best epoch
FINAL_EPOCH_FACTOR = 2
MIN_PATIENCE = 2


def final_training(cfg: RunConfig, trial_epochs: int) -> tuple[int, int | None]:
    """(the most epochs, the patience or None for never) of each final retrain, for a best
    trial that ran `trial_epochs`: --final-epochs and --final-patience where given."""
    bound = cfg.final_epochs or FINAL_EPOCH_FACTOR * trial_epochs
    patience = cfg.final_patience
    if patience is None:
        patience = max(MIN_PATIENCE, math.ceil(trial_epochs / 2))
    return bound, patience or None


def check_study_name(name: str) -> str:
    """`name`, or ConfigError when it could not be a folder of its own under --runs-dir
    (a path separator, '..', a leading dot or dash, spaces, over 100 characters)."""
    if not STUDY_NAME.fullmatch(name):
        raise ConfigError(
            f"study name {name!r} cannot be used: it names the folder under --runs-dir, so "
            "use 1-100 letters, digits and _ . + = - (not starting with . or -)")
    return name


@dataclass(frozen=True)
class RunConfig:
    study: str
    data: str = "auto"
    data_dir: str | None = None
    n_trials: int = 20  # trials this run adds
    max_trials: int | None = None  # the study's total, across every run and machine
    timeout: float | None = None  # seconds for the search, across its trials
    # per trial, and the pruners' maximum resource; None: search.run picks the study's
    # default for the data's size (search.registry.epochs_for) once the data is loaded
    epochs: int | None = None
    batch_size: int = 128  # fixed, not tuned: it is not a validation-score knob
    storage: str = "sqlite:///studies.db"
    study_name: str | None = None  # None: "<study>-<dataset>"
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # processes running trials; None: see search.workers
    # trials at once on each GPU when --workers is unset; None: the study's own choice
    workers_per_device: int | None = None
    sampler: str = "tpe"
    pruner: str = "sha"
    references: str | None = None  # one of REFERENCE_MODES; None: the study's default
    final: bool = True
    final_seeds: int = 3
    # a Pareto search's final step retrains this many front models, cheapest to most accurate
    front_models: int = 3
    # ... each above this validation accuracy; None: above chance (1 / number of classes)
    front_floor: float | None = None
    # the most epochs of each final retrain; None: FINAL_EPOCH_FACTOR x the best trial's
    final_epochs: int | None = None
    # stop a final retrain after this many epochs without a better validation accuracy;
    # None: half the best trial's epochs (at least MIN_PATIENCE); 0: never stop early
    final_patience: int | None = None
    runs_dir: str = "runs"  # final models and reports go to <runs_dir>/<study-name>/
    artifact_dir: str | None = None  # None: beside the SQLite file, else ./artifacts
    cache_dir: str | None = None  # None: beside the SQLite file (studies-cache/), else ./cache
    cache_max_gb: float = 20.0  # the cache's arrays, least recently used removed past it
    weights: str = "imagenet"  # vgg16: imagenet, none (seeded random) or a state_dict path
    input_size: int = 32  # vgg16: images are resized to this square size (at least 32)
    # --data PATH (the user's own images): search.data.ImageOptions
    image_size: int | None = None  # None: the images' own size when all share one, else 32
    channels: int | None = None  # 1 or 3; None: 1 when every image is grayscale, else 3
    test_fraction: float | None = None  # a folder without test/: None is 0.2 (0.1 >= 20,000)
    skip_bad_images: bool = False  # log and skip unreadable images instead of stopping
    augment_flips: bool = False  # the classes are mirror-invariant: augmentation may flip
    # deployment limits (search.costs.LIMITS): a config over one is never trained
    max_params: int | None = None
    max_flops: int | None = None  # multiply-adds per image
    max_latency_ms: float | None = None  # per image at batch 1, in latency_runtime
    latency_runtime: str = "onnxruntime"  # one of LATENCY_RUNTIMES
    # what the search optimizes: ("accuracy",), or accuracy and COST_OBJECTIVES (a Pareto
    # search, one direction per objective)
    objectives: tuple[str, ...] = ("accuracy",)

    def __post_init__(self) -> None:
        for flag, value, top in _BOUNDS(self):
            if value is not None and not 1 <= value <= top:
                raise ConfigError(f"{flag} must be between 1 and {top:,}, got {value:,}")
        if self.max_latency_ms is not None and not (
                isinstance(self.max_latency_ms, int | float)
                and 0 < self.max_latency_ms <= MAX_LATENCY_MS):
            raise ConfigError(f"--max-latency-ms must be milliseconds above 0 and at most "
                              f"{MAX_LATENCY_MS:,.0f}, got {self.max_latency_ms}")
        if self.final_patience is not None and not 0 <= self.final_patience <= MAX_EPOCHS:
            raise ConfigError(f"--final-patience must be between 0 (never stop early) and "
                              f"{MAX_EPOCHS:,}, got {self.final_patience:,}")
        if self.front_floor is not None and not (
                isinstance(self.front_floor, int | float) and 0 <= self.front_floor < 1):
            raise ConfigError(f"--front-floor must be a validation accuracy from 0 up to "
                              f"(not including) 1, e.g. 0.9, got {self.front_floor}")
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT_S:
            raise ConfigError(f"--timeout must be seconds between 0 and {MAX_TIMEOUT_S:,} "
                              f"(30 days), got {self.timeout}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be an integer from 0 to {MAX_SEED:,}, got "
                              f"{self.seed:,}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.latency_runtime not in LATENCY_RUNTIMES:
            raise ConfigError(f"--latency-runtime {self.latency_runtime!r}: choose one of "
                              f"{', '.join(LATENCY_RUNTIMES)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if self.references is not None and self.references not in REFERENCE_MODES:
            raise ConfigError(f"--references {self.references!r}: choose one of "
                              f"{', '.join(REFERENCE_MODES)}")
        if not (isinstance(self.cache_max_gb, int | float) and 0.01 <= self.cache_max_gb
                <= 1e6):
            raise ConfigError(f"--cache-max-gb must be from 0.01 to 1,000,000 (GB), got "
                              f"{self.cache_max_gb}")
        if not 32 <= self.input_size <= MAX_INPUT_SIZE:
            raise ConfigError(f"--input-size must be from 32 (VGG16 halves it five times) to "
                              f"{MAX_INPUT_SIZE}, got {self.input_size:,}")
        if self.image_size is not None and not MIN_IMAGE_SIZE <= self.image_size <= (
                MAX_IMAGE_SIZE):
            raise ConfigError(f"--image-size must be from {MIN_IMAGE_SIZE} to "
                              f"{MAX_IMAGE_SIZE} (pixels), got {self.image_size:,}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"--channels must be 1 (grayscale) or 3 (colour), got "
                              f"{self.channels}")
        if self.test_fraction is not None and not 0 < self.test_fraction <= 0.5:
            raise ConfigError(f"--test-fraction must be above 0 and at most 0.5, got "
                              f"{self.test_fraction}")
        if self.study_name is not None:
            check_study_name(self.study_name)
        if self.workers is not None and self.workers_per_device is not None:
            raise ConfigError("give --workers (the total) or --workers-per-device (per GPU), "
                              "not both")
        object.__setattr__(self, "objectives", parse_objectives(self.objectives))
        if self.pareto and self.pruner not in PARETO_PRUNERS:
            raise ConfigError(f"--pruner {self.pruner} ranks one objective; with --objectives "
                              f"{','.join(self.objectives)} use sha (halving among trials that "
                              f"cost no more) or none")

    @property
    def pareto(self) -> bool:
        """Whether the search has cost objectives beside accuracy (a Pareto front)."""
        return len(self.objectives) > 1

    def image_options(self):
        """How --data PATH is read (search.data.ImageOptions)."""
        from search.data import ImageOptions

        return ImageOptions(self.image_size, self.channels, self.test_fraction,
                            self.skip_bad_images)

    def limits(self) -> dict[str, float | None]:
        """The deployment limits, by search.costs.LIMITS key (None: no limit)."""
        return {"max_params": self.max_params, "max_flops": self.max_flops,
                "max_latency_ms": self.max_latency_ms}

    def metric_names(self) -> list[str]:
        """The study's names of --objectives, optuna-dashboard's labels of its axes; a
        latency names its runtime unless it is PyTorch's, as a latency was named before
        there was a choice."""
        return [ACCURACY_METRIC] + [
            COST_OBJECTIVES[name] + (" (ONNX Runtime, CPU)" if name == "latency" and
                                     self.latency_runtime == "onnxruntime" else "")
            for name in self.objectives[1:]]

    @property
    def timed(self) -> bool:
        """Whether each trial's latency is measured: an objective or a limit needs it."""
        return "latency" in self.objectives or self.max_latency_ms is not None

    @property
    def constrained(self) -> bool:
        """Whether any deployment limit is set."""
        return any(v is not None for v in self.limits().values())

    def trial_settings(self) -> dict:
        """What a trial's value depends on besides its params: each trial records these, so
        resuming a study with other settings is visible, and replayable, trial by trial."""
        return {key: getattr(self, key) for key in TRIAL_SETTINGS}

    def to_dict(self) -> dict:
        """For the study's user attributes: the storage URL's password is hidden."""
        import storage

        return {**asdict(self), "storage": storage.shown(self.storage)}


def parse_objectives(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--objectives as given ("accuracy,params") or already split: ("accuracy", costs...).
    Raises ConfigError unless accuracy comes first and each cost is known, once."""
    names = tuple(n.strip() for n in (value.split(",") if isinstance(value, str) else value))
    costs = names[1:]
    if (not names or names[0] != "accuracy" or len(set(costs)) != len(costs)
            or not set(costs) <= set(COST_OBJECTIVES)):
        raise ConfigError(f"--objectives {','.join(names)}: give accuracy, then any of "
                          f"{', '.join(COST_OBJECTIVES)} once each, e.g. accuracy,params")
    return names


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_writable(directory: str | Path, flag: str) -> None:
    """ConfigError unless `directory` is a folder, or could be made one, that this user can
    write (checked before the search, so hours of trials do not end in a PermissionError)."""
    path = Path(directory)
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{flag} {directory}: {existing} is not a folder")
    try:  # os.access says yes to root everywhere, /proc included: try it, leave nothing
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"{flag} {directory}: cannot write in {existing} "
                          f"({exc.strerror or exc}); pick a folder you can write") from None


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A trial's seed: distinct per trial, reproducible from the study seed."""
    return (study_seed * 1_000_003 + trial_number) % (2**31 - 1)


def versions() -> dict[str, str]:
    """Library versions a study or model depends on (read from the installed packages'
    metadata: importing torchvision alone takes seconds, which a new study would pay)."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name, module in (("torch", "torch"), ("torchvision", "torchvision"),
                         ("optuna", "optuna"), ("numpy", "numpy"), ("scikit-learn", "sklearn")):
        try:  # a loaded module's own string keeps a build's local label (2.5.1+cu124)
            found[name] = getattr(sys.modules.get(module), "__version__", None) or version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
