"""What the service changes inside Optuna's TPE sampler, and the proof, at run time, that
each change still matches the Optuna function it replaces.

`python -m search.run` (search.study.make_sampler) calls `install()` once per process. Four
changes, each about the cost of a trial as the study grows (benchmarks/trial_overhead.py):

- `log_ndtr`: TPE's log Phi (the normal's log CDF) from scipy's vectorized `log_ndtr`
  instead of Optuna's `_truncnorm._log_ndtr`, which calls a Python function once per array
  element (optuna/optuna#5478): about 40x faster, equal to a relative 1e-12 or an absolute
  1e-15 (closer to the true value where Phi is near 1).
- `trials_once`: the sampler sees the study through `TrialsOnce`, its trials read from the
  storage once per trial instead of once per parameter (TPE with constant_liar reads them
  again for each of about ten parameters).
- `split_once`: TPE's good/bad split (`sampler._split_trials`) made once per trial instead of
  once per parameter, memoized on that trial's TrialsOnce.
- `param_columns`: `TPESampler._get_internal_repr` reads finished trials' params from
  columns kept across trials (`ParamColumns`), each converted once, instead of a Python
  loop over the whole study per parameter and group.

A change is applied only when the Optuna function it replaces has the signature it was
written against and, on a small study built here, gives the same answer as Optuna's own.
Otherwise Optuna's code stays as it ships and one debug line says which change was left out
and why (`install()` returns the same, by change). `as_shipped()` puts Optuna's own code
back for a while (benchmarks set the two side by side).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable, Iterator

import numpy as np
import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

CHANGES = ("log_ndtr", "trials_once", "split_once", "param_columns")

# the signatures each change was written against (parameter names, in order), with the
# values a known-answer call passes for the parameters after the ones the change uses
_SPLIT_SIGNATURES = {
    ("study", "trials", "n_below"): (),  # Optuna 5.0
    ("study", "trials", "n_below", "constraints_enabled"): (False,),  # Optuna 4.9
}
_INTERNAL_REPR_SIGNATURE = ("self", "trials", "search_space", "study")  # Optuna 5.0
_GET_PARAMS_SIGNATURE = ("self", "trial", "study")
_GET_TRIALS_SIGNATURE = ("self", "deepcopy", "states", "use_cache")

_status: dict[str, str | None] | None = None  # change -> None (applied) or why not
_shipped: dict[str, Callable] = {}  # Optuna's own functions, as found before any change


def _names(function: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _tpe_modules():
    from optuna.samplers._tpe import _truncnorm
    from optuna.samplers._tpe import sampler as tpe

    return _truncnorm, tpe


def install() -> dict[str, str | None]:
    """Apply each change that proves equal to what it replaces, once per process. Returns,
    by change, None where it is applied and the reason where Optuna's own code stays."""
    global _status
    if _status is not None:
        return _status
    _status = {}
    for name, apply in (("log_ndtr", _log_ndtr), ("trials_once", _trials_once),
                        ("split_once", _split_once), ("param_columns", _param_columns)):
        try:
            reason = apply()
        except Exception as exc:  # a check that cannot even run: Optuna's code it is
            reason = f"its check raised {type(exc).__name__}: {exc}"
        _status[name] = reason
        if reason is not None:
            log.debug("TPE speed-up %r left out (Optuna %s keeps its own code): %s", name,
                      optuna.__version__, reason)
    return _status


def applied(name: str) -> bool:
    return install().get(name) is None


@contextlib.contextmanager
def as_shipped() -> Iterator[None]:
    """Optuna's TPE as it ships, inside the block (the changes installed before and after)."""
    install()
    _truncnorm, tpe = _tpe_modules()
    targets = {"log_ndtr": (_truncnorm, "_log_ndtr"), "split_once": (tpe, "_split_trials"),
               "param_columns": (tpe.TPESampler, "_get_internal_repr")}
    saved = {name: getattr(owner, attr) for name, (owner, attr) in targets.items()}
    global _status
    status = _status
    _status = {**status, "trials_once": "Optuna as shipped"}
    try:
        for name, function in _shipped.items():
            if name in targets:
                setattr(targets[name][0], targets[name][1], function)
        yield
    finally:
        for name, (owner, attr) in targets.items():
            setattr(owner, attr, saved[name])
        _status = status


# --- log_ndtr ----------------------------------------------------------------------------

# points across log Phi's branches (Optuna's: a < -20 asymptotic series, |a| small, a > 6)
_LOG_NDTR_POINTS = np.array([-60.0, -25.0, -20.0, -7.5, -1.0, -1e-3, 0.0, 0.5, 3.0, 6.0,
                             9.0, 40.0])


def _log_ndtr() -> str | None:
    from scipy.special import log_ndtr

    _truncnorm, _ = _tpe_modules()
    theirs = getattr(_truncnorm, "_log_ndtr", None)
    if not callable(theirs):
        return "optuna.samplers._tpe._truncnorm has no _log_ndtr"
    if _names(theirs) != ("a",):
        return f"_log_ndtr takes {_names(theirs)}, not ('a',)"
    expected = np.asarray(theirs(_LOG_NDTR_POINTS), dtype=float)
    got = log_ndtr(_LOG_NDTR_POINTS)
    # Optuna's loses digits where Phi is close to 1 (5.6e-8 relative at a = 6, -1e-9)
    if expected.shape != got.shape or not np.allclose(got, expected, rtol=1e-12, atol=1e-15):
        return "scipy's log_ndtr differs from Optuna's _log_ndtr on the known points"
    _shipped["log_ndtr"] = theirs
    _truncnorm._log_ndtr = log_ndtr
    return None


# --- trials_once -------------------------------------------------------------------------

class TrialsOnce:
    """A study whose trials are read from the storage once, at the first call that asks for
    them; everything else is the study's own. One per suggesting trial
    (search.study.TrialSeeded): the trials as they were at its first suggestion, running
    ones included, for all of its parameters."""

    def __init__(self, study: optuna.Study, columns: ParamColumns | None = None) -> None:
        self._study = study
        self._trials: list[optuna.trial.FrozenTrial] | None = None
        self._by_states: dict[tuple, list[optuna.trial.FrozenTrial]] = {}
        self.split_memo: dict = {}  # TPE's good/bad split of those trials (split_once)
        self.param_columns = columns  # and their params (kept across trials)
        self.param_groups: dict = {}  # the groups' numbers, for param_columns

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        if self._trials is None:
            self._trials = self._study._get_trials(deepcopy=False, states=None,
                                                   use_cache=False)
        if states is None:
            trials = self._trials
        else:  # asked again for each parameter: filtered once
            key = tuple(states)
            trials = self._by_states.get(key)
            if trials is None:
                trials = self._by_states[key] = [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy, states)


def _trials_once() -> str | None:
    if _names(optuna.Study._get_trials) != _GET_TRIALS_SIGNATURE:
        return f"Study._get_trials takes {_names(optuna.Study._get_trials)}"
    study = _known_study()
    view = TrialsOnce(study)
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    for kwargs in ({}, {"states": states}, {"states": states, "use_cache": True}):
        ours = [t.number for t in view._get_trials(deepcopy=False, **kwargs)]
        theirs = [t.number for t in study._get_trials(deepcopy=False, **kwargs)]
        if ours != theirs:
            return f"the trials it shows for {kwargs} differ from the study's"
    return None  # nothing replaced: search.study.TrialSeeded asks applied("trials_once")


# --- split_once --------------------------------------------------------------------------

def _split_once() -> str | None:
    _, tpe = _tpe_modules()
    split = getattr(tpe, "_split_trials", None)
    if not callable(split):
        return "optuna.samplers._tpe.sampler has no _split_trials"
    extra = _SPLIT_SIGNATURES.get(_names(split))
    if extra is None:
        return f"_split_trials takes {_names(split)}"

    def split_trials(study, trials, n_below, *rest):
        memo = getattr(study, "split_memo", None)
        if memo is None:
            return split(study, trials, n_below, *rest)
        # the same trial objects (the view's): their ids stay theirs, as the split held
        # here holds every one of them
        key = (n_below, rest, tuple(map(id, trials)))
        if key not in memo:
            memo[key] = split(study, trials, n_below, *rest)
        return memo[key]  # the same lists each time: TPE only reads them

    study = _known_study()
    trials = study._get_trials(deepcopy=False)
    trials = [t for t in trials if t.state != TrialState.FAIL]
    view = TrialsOnce(study)
    for n_below in (1, 2):
        theirs = split(study, trials, n_below, *extra)
        for _ in range(2):  # made, then from the memo
            ours = split_trials(view, trials, n_below, *extra)
            if [[t.number for t in group] for group in ours] != [
                    [t.number for t in group] for group in theirs]:
                return f"its split differs from Optuna's (n_below={n_below})"
    _shipped["split_once"] = split
    tpe._split_trials = split_trials
    return None


# --- param_columns -----------------------------------------------------------------------

class ParamColumns:
    """What TPE's _get_internal_repr returns, from columns: for each (param, distribution)
    the finished trials' values as TPE converts them, indexed by trial number, each
    converted once for the life of the sampler. A running trial (TPE's constant liar counts
    them) may still suggest more, so its params are read as Optuna reads them, each time.
    Same arrays, in the same order, as Optuna's loop (checked by install() and
    tests/test_tpe_speedups.py). One trial suggests at a time (the service's workers are
    processes, not threads of one sampler)."""

    def __init__(self) -> None:
        # (name, distribution) -> [value, has the param, looked at] arrays by trial number
        self._columns: dict[tuple, list[np.ndarray]] = {}

    @staticmethod
    def _group(trials: list, groups: dict) -> tuple:
        """`trials` with their numbers and which are finished, kept in `groups` (one
        trial's: by id, which each list keeps while held there)."""
        held = groups.get(id(trials))
        if held is None:
            numbers = np.fromiter((t.number for t in trials), dtype=np.int64, count=len(trials))
            finished = np.fromiter((t.state.is_finished() for t in trials), dtype=bool,
                                   count=len(trials))
            held = groups[id(trials)] = (trials, numbers, finished)
        return held

    def _column(self, name: str, distribution, size: int) -> list[np.ndarray]:
        column = self._columns.get((name, distribution))
        if column is None:
            column = self._columns[name, distribution] = [
                np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)]
        if len(column[0]) < size:
            grown = max(size, 2 * len(column[0]))
            for i, array in enumerate(column):
                column[i] = np.concatenate([array, np.zeros(grown - len(array), array.dtype)])
        return column

    def internal_repr(self, sampler, trials, search_space, study,
                      groups: dict) -> dict[str, np.ndarray]:
        trials, numbers, finished = self._group(trials, groups)
        size = int(numbers.max()) + 1 if len(numbers) else 0
        keep = finished.copy()  # which trials have every param; running ones decided below
        values = {}
        for name, distribution in search_space.items():
            value, has, looked = self._column(name, distribution, size)
            for position in np.flatnonzero(finished & ~looked[numbers]):
                number, params = numbers[position], trials[position].params
                if name in params:  # may raise, as Optuna's loop: then asked again next time
                    value[number], has[number] = distribution.to_internal_repr(params[name]), 1
                looked[number] = True
            keep &= has[numbers]
            values[name] = value[numbers]
        for position in np.flatnonzero(~finished):
            params = sampler._get_params(trials[position], study)
            if search_space.keys() <= params.keys():
                keep[position] = True
                for name, distribution in search_space.items():
                    values[name][position] = distribution.to_internal_repr(params[name])
        return {name: column[keep] for name, column in values.items()}


def _param_columns() -> str | None:
    _, tpe = _tpe_modules()
    internal_repr = getattr(tpe.TPESampler, "_get_internal_repr", None)
    get_params = getattr(tpe.TPESampler, "_get_params", None)
    if not callable(internal_repr) or not callable(get_params):
        return "TPESampler has no _get_internal_repr or _get_params"
    if _names(internal_repr) != _INTERNAL_REPR_SIGNATURE:
        return f"TPESampler._get_internal_repr takes {_names(internal_repr)}"
    if _names(get_params) != _GET_PARAMS_SIGNATURE:
        return f"TPESampler._get_params takes {_names(get_params)}"

    def get_internal_repr(self, trials, search_space, study):
        columns = getattr(study, "param_columns", None)
        if columns is None:
            return internal_repr(self, trials, search_space, study)
        return columns.internal_repr(self, trials, search_space, study, study.param_groups)

    study = _known_study()
    sampler = study.sampler
    view = TrialsOnce(study, ParamColumns())
    trials = view._get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    spaces = [{name: distribution} for name, distribution in _KNOWN_SPACE.items()]
    for space in [*spaces, _KNOWN_SPACE]:
        theirs = internal_repr(sampler, trials, space, study)
        ours = get_internal_repr(sampler, trials, space, view)
        if ours.keys() != theirs.keys() or any(
                ours[name].tolist() != theirs[name].tolist() for name in space):
            return f"its arrays differ from Optuna's for {sorted(space)}"
    _shipped["param_columns"] = internal_repr
    tpe.TPESampler._get_internal_repr = get_internal_repr
    return None


# --- the known study the checks run on -----------------------------------------------------

_KNOWN_SPACE = {
    "n_layers": optuna.distributions.IntDistribution(1, 3),
    "width": optuna.distributions.IntDistribution(16, 1024, log=True),
    "rate": optuna.distributions.FloatDistribution(0.0, 0.5),
    "pair": optuna.distributions.CategoricalDistribution(["relu_ce", "elu_ls", None]),
}


def _known_study() -> optuna.Study:
    """An in-memory TPE study of eight trials: complete, pruned, failed and running, one
    without every param (a few milliseconds)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=0))
        for i in range(8):
            params = {name: [1, 64, 0.25, "elu_ls"][j] if (i + j) % 3 else
                      [3, 512, 0.1, None][j] for j, name in enumerate(_KNOWN_SPACE)}
            if i == 5:
                params.pop("rate")
            study.enqueue_trial(params)  # these values, not drawn ones
            trial = study.ask({k: _KNOWN_SPACE[k] for k in params})
            if i in (1, 4):
                trial.report(0.3 + i / 20, 1)
                study.tell(trial, state=TrialState.PRUNED)
            elif i == 6:
                study.tell(trial, state=TrialState.FAIL)
            elif i < 7:
                study.tell(trial, 0.5 + (i * 7 % 5) / 10)
        return study
    finally:
        optuna.logging.set_verbosity(verbosity)
