"""The arithmetic of benchmarks/search_efficiency.py's table: what benchmarks/RESULTS.md quotes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_efficiency", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(events, finished):
    return {"events": [{"t": t, "acc": acc, "trial": 0} for t, acc in events],
            "finished": [{"t": t, "state": "COMPLETE"} for t in finished], "references": []}


def test_summary_counts_only_what_happened_within_the_budget(bench):
    runs = [
        # first score at 4 s, the target reached at 9 s, a higher score after the budget
        _run([(4.0, 0.90), (9.0, 0.951), (12.0, 0.96), (31.0, 0.99)], [5.0, 12.0, 40.0]),
        _run([(6.0, 0.93), (20.0, 0.949)], [7.0]),  # never reaches the target
        _run([(5.0, 0.95)], [5.5, 6.0]),  # reaches it with its first score, exactly
    ]
    summary = bench._summarize(runs, budget=30.0, target=0.95)
    assert summary["times"] == [9.0, math.inf, 5.0]
    assert summary["firsts"] == [4.0, 6.0, 5.0]
    assert summary["bests"] == [0.96, 0.949, 0.95]
    assert summary["trials"] == [2, 1, 2]
    assert (summary["time"], summary["first"], summary["best"]) == (9.0, 5.0, 0.95)

    table = bench._table({"ours": summary}, 30.0, 0.95)
    assert "| ours | 9.0 s [5.0 s - > 30 s] | 2/3 | 5.0 s | 0.9500 [0.9490 - 0.9600] |" in table


def test_the_best_config_of_a_run_is_the_best_score_within_the_budget(bench):
    from types import SimpleNamespace as Trial

    t0 = 1000.0
    early = Trial(intermediate_values={1: 0.90, 2: 0.93}, user_attrs={"epoch_ended": [1005, 1010]})
    # its higher score came after the budget (30 s): it does not count
    late = Trial(intermediate_values={1: 0.92, 2: 0.99}, user_attrs={"epoch_ended": [1020, 1040]})
    study = Trial(trials=[early, late, Trial(intermediate_values={}, user_attrs={})])
    assert bench._best_within(study, t0, 30.0) is early
    assert bench._best_within(study, t0, 60.0) is late
    # a script's trials carry no end times: it reports nothing after the budget
    script = Trial(trials=[Trial(intermediate_values={1: 0.5}, user_attrs={})])
    assert bench._best_within(script, t0, 30.0) is script.trials[0]
    assert bench._best_within(Trial(trials=[]), t0, 30.0) is None


def test_the_table_gives_the_retrained_test_accuracy_where_measured(bench):
    with_test = {**_run([(4.0, 0.95)], [5.0]), "test": 0.9412}
    summary = bench._summarize([with_test, _run([(4.0, 0.94)], [5.0])], 30.0, 0.95)
    assert summary["tests"] == [0.9412]  # the run without one is left out, not zero
    assert bench._table({"x": summary}, 30.0, 0.95).endswith("| 0.9412 [0.9412 - 0.9412] |")
    none = bench._summarize([_run([(4.0, 0.94)], [5.0])], 30.0, 0.95)
    assert bench._table({"x": none}, 30.0, 0.95).endswith("| - |")


def test_ratio_says_by_when_ours_had_to_reach_the_target(bench):
    ours = {"time": 8.0, "first": 5.0}
    assert bench._ratio({"time": 64.0}, ours, 300.0) == "8.0x"
    line = bench._ratio({"time": 64.0}, ours, 300.0, bench.WANTED["naive"])
    assert line == ("8.0x (20x needs ours by 3.2 s; its first validation score came at "
                    "5.0 s, median)")
    assert bench._ratio({"time": math.inf}, ours, 300.0, 3.0).startswith("> 37.5x")
    assert bench._ratio({"time": 64.0}, {"time": math.inf, "first": 5.0}, 300.0,
                        3.0).startswith("n/a")


def _prints_before_header(path: Path) -> list[int] | None:
    """Lines of main()'s print calls that come before its header() call; None when main()
    never calls header()."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = sorted((n for n in ast.walk(main) if isinstance(n, ast.Call)),
                   key=lambda n: (n.lineno, n.col_offset))
    names = [(getattr(c.func, "id", getattr(c.func, "attr", "")), c.lineno) for c in calls]
    at = next((line for name, line in names if name == "header"), None)
    if at is None:
        return None
    return [line for name, line in names if name == "print" and line < at]


@pytest.mark.parametrize("path", sorted(p for p in PATH.parent.glob("*.py")
                                        if p.name != "machine.py"), ids=lambda p: p.name)
def test_every_benchmark_prints_its_machine_header_first(path):
    assert _prints_before_header(path) == [], f"{path.name}: header() not printed first"


def test_the_gpu_check_prints_the_machine_header_first():
    script = (PATH.parent / "gpu_check.sh").read_text(encoding="utf-8")
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    first_output = next(i for i, line in enumerate(body) if "echo" in line or "python" in line)
    assert "benchmarks/machine.py" in body[first_output], body[first_output]


def test_the_machine_header_names_the_machine():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(PATH.parent / "machine.py")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for field in ("date", "commit", "cpu", "gpu", "os", "versions", "command"):
        assert any(line.startswith(field) for line in out.splitlines()), (field, out)
    assert "cores" in out and "torch" in out and "optuna" in out
