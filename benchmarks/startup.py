"""python benchmarks/startup.py [--data mnist-5k] [--data-dir DIR] [--repeats 3] [--workers 2]
    [--timeout 12]

How soon after `python -m search.run --study mlp` starts does each worker's first epoch end?
On a small data set that, not the trials, decides how soon a search finds its first good
model (benchmarks/search_efficiency.py's time-to-target counts from the process start).
Ways of starting the workers after the first (the parent) and of loading the data, side by
side, each run a fresh process, one at a time, interleaved:

  spawn, cold       each other worker a spawned process (what the service starts on Windows),
                    which imports the service, then torch._dynamo at its first optimizer
                    step; the data parsed and split with scikit-learn at every start
  spawn, warm       the same with the data cache (search.data.cache_home) already filled
  forkserver, warm  workers forked from a fork server started before the data loads, which
                    imports the service and torch._dynamo (search.workers: what the
                    service uses with GPUs or multi-threaded workers)
  fork, cold        workers forked from the parent itself, cache empty
  fork, warm        the service as it is on a CPU-only machine (single-threaded workers),
                    on every start after a machine's first

Per arm, medians over repeats: when this process's own first epoch ended, when the first
epoch of any other worker ended, and when the last worker's first epoch ended, in seconds
since the process started. The last lines divide the old way's (spawn, cold) times by the
service's (fork, warm).

Not a test: the machine is shared and timings are noisy. About 5 * repeats * (timeout
+ 10 s): 6 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's service, as the runs below use
from search.objective import worker_id  # noqa: E402 - after the path above

# the run, its workers started the way the arm names (search.workers.start_method)
RUN = """
import sys
from search import workers
workers.start_method = lambda devices, method=sys.argv[1]: method
from search.run import main
sys.exit(main(sys.argv[2:]))
"""
ARMS = (("spawn", "cold"), ("spawn", "warm"), ("forkserver", "warm"), ("fork", "cold"),
        ("fork", "warm"))


def _run(start: str, cache: str, args, workdir: Path, warm_home: Path) -> dict[str, float]:
    import optuna

    home = warm_home if cache == "warm" else Path(tempfile.mkdtemp(dir=workdir))
    db = workdir / "s.db"
    db.unlink(missing_ok=True)
    command = [sys.executable, "-c", RUN, start, "--study", "mlp", "--data", args.data,
               "--storage", f"sqlite:///{db}", "--study-name", "startup", "--no-final",
               "--device", "cpu", "--workers", str(args.workers),
               "--n-trials", "100000", "--timeout", str(args.timeout)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    env = {**os.environ, "SEARCH_CACHE_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    if process.wait(timeout=600) != 0:
        raise SystemExit(f"{start}, {cache}: the run exited {process.returncode}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="startup", storage=f"sqlite:///{db}")
    first: dict[str, float] = {}  # worker -> when its first epoch ended
    for trial in study.trials:
        ended = trial.user_attrs.get("epoch_ended")
        if ended:
            worker = trial.user_attrs["worker"]
            first[worker] = min(first.get(worker, float("inf")), ended[0] - t0)
    parent = worker_id(process.pid)
    others = [t for w, t in first.items() if w != parent]
    return {"parent": first.get(parent, float("nan")),
            "other": min(others, default=float("nan")),
            "last": max(first.values()) if len(first) == args.workers else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--data-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=12.0, help="each run's --timeout: "
                        "long enough for every worker to start (default 12)")
    args = parser.parse_args()
    from machine import header  # benchmarks/machine.py, beside this script

    print(header(), flush=True)  # date, commit, CPU, GPU, versions, this command
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    results: dict[tuple[str, str], list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="search-startup-") as tmp:
        workdir = Path(tmp)
        warm_home = workdir / "warm-cache"
        os.environ["SEARCH_CACHE_HOME"] = str(warm_home)
        from search import data as data_module

        data_module.load(args.data, args.data_dir)  # fills the warm cache
        for repeat in range(args.repeats):
            for arm in ARMS:
                results[arm].append(_run(*arm, args, workdir, warm_home))
                print(f"repeat {repeat} {arm[0]}, {arm[1]}: " + ", ".join(
                    f"{k} {v:.1f} s" for k, v in results[arm][-1].items()), flush=True)
    print(f"\n{args.data}, --workers {args.workers}, medians of {args.repeats} "
          "(seconds from the process start to the end of a worker's first epoch):\n")
    print("| start | data cache | this process | first other worker | last worker |")
    print("|---|---|---|---|---|")
    medians = {}
    for arm in ARMS:
        medians[arm] = {k: statistics.median(r[k] for r in results[arm])
                        for k in ("parent", "other", "last")}
        print(f"| {arm[0]} | {arm[1]} | " + " | ".join(
            f"{medians[arm][k]:.1f} s" for k in ("parent", "other", "last")) + " |")
    old, new = medians[("spawn", "cold")], medians[("fork", "warm")]
    print()
    for key, label in (("parent", "this process's first epoch"),
                       ("other", "the first other worker's first epoch"),
                       ("last", "the last worker's first epoch")):
        print(f"{label}: {old[key]:.1f} s -> {new[key]:.1f} s ({old[key] / new[key]:.2f}x "
              "sooner)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
