"""What the three command lines (search.run, search.final, search.evaluate) share: a parser
that reports a malformed argument in one line with exit code 2, and logging that prints
through tqdm so progress bars stay intact. No CLI imports another CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys

import optuna
from tqdm import tqdm


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
