"""Error kinds of the service.

Two kinds, as keras-tuner has them: a bad *configuration* (unknown study, unreadable data,
bad storage URL) stops the run before the first trial with one clear line and exit code 2;
a bad *trial* (NaN loss, out of memory) is pruned or failed and the study goes on.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The run cannot start: the message says what is wrong and how to fix it."""


class DataError(ConfigError):
    """A data source is missing, malformed or inconsistent; the message names the file."""


class StorageError(ConfigError):
    """The storage URL is malformed or the database cannot be reached."""


class TrialDiverged(Exception):
    """Training produced a non-finite or exploding loss; the trial is pruned with the reason."""


class DeadlineReached(Exception):
    """The search's --timeout came while a trial trained: it stops, pruned at its last
    score, so the search ends when it was asked to."""
