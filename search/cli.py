"""What the four command lines (search.run, search.final, search.evaluate, search.replay)
share: a parser that reports a malformed argument in one line with exit code 2, shows each
option's default from the parser itself and answers --version, and logging that prints
through tqdm so progress bars stay intact. No CLI imports another CLI.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import textwrap
from collections.abc import Callable
from importlib import metadata

import optuna
from tqdm import tqdm

from search.errors import ConfigError

# what every command's --help ends with, and docs/cli.md lists
EXIT_CODES = (
    (0, "done"),
    (2, "bad input: one line on stderr saying what is wrong and how to fix it; nothing written"),
    (130, "interrupted (Ctrl-C): what was finished is kept (search.run: finished trials; "
          "running ones are marked failed); the same command resumes"),
)


# the environment variables the commands read, for docs/cli.md
ENVIRONMENT = (
    ("SEARCH_DATA_DIR", "where mnist and fashion-mnist IDX files are looked for and downloaded "
                        "to, when --data-dir is not given (else ./data)"),
    ("SEARCH_CACHE_HOME", "the per-machine data cache: parsed pixels and split indices "
                          "(default $XDG_CACHE_HOME/optuna-search, else "
                          "~/.cache/optuna-search); delete it at any time"),
    ("KERAS_HOME", "where the Keras MNIST cache datasets/mnist.npz is looked for (default "
                   "~/.keras)"),
    ("TORCH_HOME", "where torchvision keeps VGG16's ImageNet weights, "
                   "hub/checkpoints/vgg16-397923af.pth (default ~/.cache/torch)"),
    ("CUDA_VISIBLE_DEVICES", "the GPUs CUDA shows to the commands (--device auto uses them "
                             "all)"),
)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_line() -> str:
    """The product's version and those of the libraries its results depend on."""
    return (f"optuna-search {_version('optuna-search')} (optuna {_version('optuna')}, "
            f"torch {_version('torch')}, python {platform.python_version()})")


def describe(doc: str) -> str:
    """A command's description for --help: its module docstring without the usage line it
    opens with (argparse prints the usage itself)."""
    _, _, rest = doc.strip().partition("\n\n")
    return rest.strip() or doc.strip()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs and adds each option's default to its help, read
    from the parser (so help and behaviour cannot disagree); flags and unset options show
    none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None
                or isinstance(default, bool) or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), defaults shown, --version and the exit codes
    after the options."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        codes = "\n".join(textwrap.fill(meaning, 88, initial_indent=f"  {code:<4} ",
                                         subsequent_indent=" " * 7)
                           for code, meaning in EXIT_CODES)
        epilog = kwargs.pop("epilog", None)
        kwargs["epilog"] = (f"{epilog}\n\n" if epilog else "") + f"exit codes:\n{codes}"
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line(),
                          help="print the versions of this package, Optuna, torch and Python "
                          "and exit")

    def error(self, message: str):  # one line, exit 2, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_final_options(group) -> None:
    """The final step's flags, which search.run and search.final share."""
    group.add_argument("--final-seeds", type=int, default=3, metavar="N",
                       help="seeds the best config and each reference config are retrained "
                       "with")
    group.add_argument("--final-epochs", type=int, metavar="N",
                       help="the most epochs of each final retrain (default: twice the best "
                       "trial's epochs: the cost is paid once)")
    group.add_argument("--final-patience", type=int, metavar="P",
                       help="stop a final retrain after P epochs without a better validation "
                       "accuracy, keeping its best epoch (default: half the best trial's "
                       "epochs, at least 2; 0: never stop early)")
    group.add_argument("--front-models", type=int, default=3, metavar="K",
                       help="with --objectives: how many Pareto-optimal trials the final step "
                       "retrains and saves, spread from the cheapest to the most accurate")
    group.add_argument("--front-floor", type=float, metavar="ACC",
                       help="with --objectives: the front models retrained score above ACC "
                       "validation accuracy (default: above chance, 1 / number of classes)")
    group.add_argument("--runs-dir", default="runs", metavar="DIR",
                       help="the final model and report go to DIR/<study-name>/")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    # alembic (under Optuna's RDB storage) re-reads its logging config and lists its plugins
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith("alembic"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # we log each trial ourselves, failures in one line with their reason (Optuna's own
    # warning would add the traceback of every failed trial)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def run_command(body: Callable[[], None], interrupted: str) -> int:
    """A command's exit code: 0 when `body` returns, 2 with one line for a ConfigError (bad
    input), 130 with the line `interrupted` for Ctrl-C."""
    try:
        body()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


class Steps:
    """Progress over a known number of steps: a bar when stderr is a terminal, and one log
    line per step either way (so a log file shows the same progress)."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.done, self.what = total, 0, what
        # disable=None: no bar when stderr is not a terminal (CI logs, nohup)
        self.bar = tqdm(total=total, desc=what, unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)

    def __call__(self, step: str) -> None:
        self.done += 1
        logging.getLogger("search").info("%s %d/%d: %s", self.what, self.done, self.total,
                                         step)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
