"""The command line: help, errors as one line with exit code 2, and a real run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search.run import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_studies(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "mlp " in result.stdout and "optuna-dashboard" in result.stdout


# every bad flag and file: tests/test_bad_input.py


def test_malformed_idx_file_is_one_line_naming_it(tmp_path, capsys):
    from tests.test_data import write_mnist_dir

    write_mnist_dir(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    assert main(["--study", "mlp", "--data", "mnist", "--data-dir", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t10k-images-idx3-ubyte" in err[0]


def test_no_traceback_from_a_real_process(tmp_path):
    result = run_cli("--study", "mlp", "--storage", "sqlite:///no/such/dir.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: storage sqlite:///no/such/dir.db: directory no/such does not exist; "
        "create it first"
    ]


def test_end_to_end_run_writes_study_and_final_files(tmp_path):
    # the defaults: one single-threaded worker per core, reference configs not searched
    # (the final step retrains them), successive halving
    result = run_cli("--study", "mlp", "--data", "digits", "--n-trials", "4", "--epochs", "3",
                     "--final-seeds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1:
        assert f"{workers} workers on cpu" in result.stderr
    assert "reference configs not searched" in result.stderr and "[lecture]" not in result.stderr
    assert "best=" in result.stderr
    study = optuna.load_study(study_name="mlp-digits", storage="sqlite:///studies.db")
    # workers stop at the budget; two finishing at the same instant may add one more
    assert 4 <= len(study.trials) <= 5 and study.best_value > 0.5
    assert not any("reference" in t.user_attrs for t in study.trials)
    assert study.user_attrs["config"]["pruner"] == "sha"
    report = (tmp_path / "runs" / "mlp-digits" / "report.md").read_text(encoding="utf-8")
    assert "lecture" in report and "seed" in report  # retrained by the final step
    assert (tmp_path / "studies.db").is_file()
    for name in ("model.pt", "model.json", "model.onnx", "metrics.json", "report.html"):
        assert (tmp_path / "runs" / "mlp-digits" / name).is_file()
    assert any((tmp_path / "studies-artifacts").iterdir())
    assert "final model: test accuracy" in result.stderr


def test_two_workers_share_one_budget_and_log_every_trial(tmp_path):
    result = run_cli("--study", "mlp", "--data", "digits", "--n-trials", "6", "--epochs", "2",
                     "--workers", "2", "--device", "cpu", "--no-final", "--references",
                     "prunable", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 workers on cpu, cpu" in result.stderr
    study = optuna.load_study(study_name="mlp-digits", storage="sqlite:///studies.db")
    trials = study.get_trials()
    # workers stop at the budget; two finishing at the same instant may add one more
    assert 6 <= len(trials) <= 7
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    assert sorted(t.user_attrs.get("reference", "") for t in trials)[-2:] == ["lecture", "seed"]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    for trial in trials:
        assert f"trial {trial.number} " in result.stderr


@pytest.mark.parametrize("study, small, large", [("mlp", 20, 10), ("cnn", 8, 3),
                                                  ("vgg16", 10, 10)])
def test_epochs_default_to_the_studys_own_for_the_datas_size(study, small, large):
    from search import registry
    from search.run import config_from_args

    assert config_from_args(["--study", study]).epochs is None  # chosen once data is loaded
    assert config_from_args(["--study", study, "--epochs", "3"]).epochs == 3
    spec = registry.get(study)
    assert registry.epochs_for(spec, 3_200, 128) == small  # mnist-5k's training split
    assert registry.epochs_for(spec, 54_000, 128) == large  # MNIST's 60,000 less validation
    assert registry.epochs_for(spec, 10**7, 128) == min(small, registry.MIN_EPOCHS) or (
        spec.steps_per_trial is None)
    assert config_from_args(["--study", study, "--cache-dir", "c"]).cache_dir == "c"


@pytest.mark.parametrize("study, flags, expected", [
    ("mlp", [], ["cuda:0", "cuda:1"] * 4),  # the study's own trials per GPU
    ("cnn", [], ["cuda:0", "cuda:1"] * 2),
    ("mlp", ["--workers-per-device", "1"], ["cuda:0", "cuda:1"]),
    ("mlp", ["--workers", "3"], ["cuda:0", "cuda:1", "cuda:0"]),
    ("mlp", ["--device", "cpu"], None),  # the CPU's own default, whatever the GPUs
])
def test_workers_per_gpu_and_on_the_cpu(monkeypatch, study, flags, expected):
    import torch

    from search import workers
    from search.run import config_from_args

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    devices = workers.plan_devices(config_from_args(["--study", study, *flags]))
    assert devices == (expected or ["cpu"] * workers.cpu_workers())


@pytest.mark.parametrize(("gpus", "flags", "expected"), [
    (4, ["--device", "cuda:1"], ["cuda:1"] * 4),  # the study's trials per GPU, on that one
    (4, ["--device", "cuda:1", "--workers-per-device", "2"], ["cuda:1"] * 2),
    (4, ["--device", "cuda:0", "--workers", "3"], ["cuda:0"] * 3),
    (1, [], ["cuda:0"] * 4),  # a machine with one GPU
    (1, ["--device", "cuda"], ["cuda:0"] * 4),
])
def test_one_named_gpu_is_planned_as_one_gpu(monkeypatch, gpus, flags, expected):
    import torch

    from search import workers
    from search.run import config_from_args

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert workers.plan_devices(config_from_args(["--study", "mlp", *flags])) == expected


def test_gpus_cuda_cannot_run_on_are_not_planned(monkeypatch, caplog, capsys):
    """torch counts 4 GPUs (NVML) but CUDA cannot run (a driver older than the build): the
    CPU plan and one line saying why; --device cuda is refused in one line."""
    import torch

    from search import workers
    from search.run import config_from_args, main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices = workers.plan_devices(config_from_args(["--study", "mlp"]))
    assert devices == ["cpu"] * workers.cpu_workers()
    lines = [r.getMessage() for r in caplog.records if "cannot run CUDA" in r.getMessage()]
    assert len(lines) == 1 and "sees 4 GPU(s)" in lines[0] and "driver" in lines[0]
    capsys.readouterr()  # that warning, where an earlier test left a handler on stderr
    assert main(["--study", "mlp", "--data", "digits", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot run CUDA" in err[0]


@pytest.mark.cpu_default
def test_cpu_workers_follow_the_cores():
    from search import workers

    assert workers.CPU_WORKERS_PER_CORE  # the measured default (benchmarks/RESULTS.md, "Defaults")
    for cores, expected in ((1, 1), (2, 2), (16, workers.CPU_WORKERS_MAX), (128, 8)):
        assert workers.cpu_workers(cores) == expected


def _report_worker_start(queue, environ) -> None:
    """A stand-in for search.workers._worker: what a worker finds when it starts."""
    import sys

    from search import workers

    preloaded = "torch._dynamo" in sys.modules  # before anything here imports it
    workers.adopt(environ)
    queue.put((preloaded, os.environ.get("SEARCH_PROBE"), os.getppid()))


def test_workers_come_warm_from_the_fork_server_with_the_parents_environment(monkeypatch):
    """Workers are forked from a server started early that imported the service and
    torch._dynamo (every optimizer's first step imports it: seconds in a worker's first
    epoch); each takes the parent's environment as it is when the worker starts, not as it
    was when the server started."""
    import multiprocessing

    from search import workers

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork server on this platform: workers are spawned")
    gpus = ["cuda:0", "cuda:0"]  # what makes a run use the fork server
    assert workers.start_method(gpus) == "forkserver"
    workers.prestart(gpus)
    context = workers._context("forkserver")
    monkeypatch.setenv("SEARCH_PROBE", "set after the server started")
    queue = context.Queue()
    process = context.Process(target=_report_worker_start, args=(queue, dict(os.environ)))
    process.start()
    preloaded, probe, parent = queue.get(timeout=120)
    process.join(timeout=60)
    assert process.exitcode == 0
    assert preloaded, "torch._dynamo was not imported by the fork server"
    assert probe == "set after the server started"
    assert parent != os.getpid()  # forked by the server, not by this process


def test_cpu_workers_are_forks_of_the_parent_and_others_come_from_the_fork_server(
        monkeypatch):
    from search import workers

    if not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert workers.start_method(["cpu"] * 4) == "fork"  # the default: one thread each
    assert workers.start_method(["cpu"] * 2) == "forkserver"  # two threads each
    assert workers.start_method(["cuda:0", "cuda:1"]) == "forkserver"
    assert workers.start_method(["cpu", "cuda:0"]) == "forkserver"
    # a gRPC channel open in the parent must not be copied by a fork
    assert workers.start_method(["cpu"] * 4, "grpc://127.0.0.1:13000") == "forkserver"


def test_a_fork_server_is_started_only_for_workers_it_will_fork(monkeypatch):
    """One worker (--workers 1, or one GPU with one trial at a time) is this process alone: a
    fork server would only import torch beside it, on the core its start-up needs, and stay
    alive until the run ends (a --workers 1 run took 1.7 s longer with it, median of 4)."""
    from multiprocessing import forkserver

    from search import workers

    started = []
    monkeypatch.setattr(forkserver, "ensure_running", lambda: started.append(True))
    monkeypatch.setattr(workers, "_unforked_method", lambda: "forkserver")
    for devices, wanted in ((["cuda:0"], []), (["cpu"], []), (["cuda:0"] * 2, [True])):
        workers.prestart(devices)
        assert started == wanted, devices
        started.clear()


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_started_either_way_run_trials_of_the_study(tmp_path, monkeypatch, method):
    """The parent takes its trials only once the other worker, forked or from the fork
    server, has taken one: each way of starting a worker gives one that runs trials."""
    import multiprocessing
    import time

    from search import workers
    from search.config import RunConfig
    from search.objective import worker_id
    from search.run import search

    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    monkeypatch.setattr(workers, "start_method", lambda devices, storage_url="": method)
    parent, pull = os.getpid(), workers._pull_trials

    def pull_after_the_other(study, *args):  # a forked worker has this too: it pulls at once
        deadline = time.monotonic() + 180
        while os.getpid() == parent and not study.trials and time.monotonic() < deadline:
            time.sleep(0.2)
        pull(study, *args)

    monkeypatch.setattr(workers, "_pull_trials", pull_after_the_other)
    study, _, _ = search(RunConfig(study="mlp", data="digits", n_trials=4, epochs=2,
                                   workers=2, device="cpu", final=False,
                                   storage=f"sqlite:///{tmp_path / 's.db'}"))
    by = [t.user_attrs.get("worker") for t in study.trials]
    assert study.trials[0].user_attrs["worker"] != worker_id(), by
    assert all(t.state.is_finished() for t in study.trials) and len(by) >= 4, by


def test_the_parent_process_is_one_of_the_workers(tmp_path):
    """With --workers 2 this process runs trials itself, single-threaded like each other
    worker; it gets its threads back for the final step."""
    import torch

    from search.config import RunConfig
    from search.objective import worker_id
    from search.run import search

    threads = torch.get_num_threads()
    study, _, _ = search(RunConfig(study="mlp", data="digits", n_trials=4, epochs=2,
                                   workers=2, device="cpu", final=False,
                                   storage=f"sqlite:///{tmp_path / 's.db'}"))
    ours = [t for t in study.trials if t.user_attrs.get("worker") == worker_id()]
    assert ours, [t.user_attrs.get("worker") for t in study.trials]
    assert {t.user_attrs["threads"] for t in ours} == {max(1, (os.cpu_count() or 1) // 2)}
    assert torch.get_num_threads() == threads
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.parametrize(("devices", "cores", "each"), [
    (["cuda:0", "cuda:1", "cuda:2", "cuda:3"], 8, 2),  # four GPU workers share 8 cores
    (["cuda:0"] * 8, 4, 1),
    (["cpu", "cpu"], 8, 4),
])
def test_every_worker_gets_its_share_of_the_cores_gpu_workers_too(monkeypatch, devices,
                                                                    cores, each):
    """The threads handed to each worker (and set in this process, the first worker) are the
    cores shared among all workers, GPU or CPU: a GPU worker took every core, and its
    augmentation pool as many processes."""
    import torch

    from search import objective as objective_module
    from search import workers
    from search.config import RunConfig

    monkeypatch.setattr(workers.os, "cpu_count", lambda: cores)
    started, seen = [], []

    class Context:  # a process is made, never started: its arguments are recorded
        def Process(self, target, name, args):  # noqa: N802 - multiprocessing's name
            started.append(args)
            return type("P", (), {"start": lambda self: None})()

    class Monitor:
        pids = ()

        def __init__(self, study, count, start, target, reporter):
            self.start_one = start

        def start_workers(self):
            pass

        def start(self):
            for slot in range(1, len(devices)):
                self.start_one(slot)

        def join(self):
            pass

        def report_new(self):
            pass

    class Objective:  # this process's trials: none run, the thread count is read
        def __init__(self, *args, **kwargs):
            seen.append(torch.get_num_threads())

    current = []  # torch.cuda.set_device's calls
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    monkeypatch.setattr(workers, "_Monitor", Monitor)
    monkeypatch.setattr(workers, "_pull_trials", lambda *args: None)
    monkeypatch.setattr(objective_module, "Objective", Objective)
    monkeypatch.setattr(workers, "start_method", lambda devices, storage_url="": "spawn")
    monkeypatch.setattr(workers, "_context", lambda method: Context())
    study = optuna.create_study()
    threads = torch.get_num_threads()
    from search import data as data_module

    workers.run_workers(study, RunConfig(study="mlp", data="digits", n_trials=1), devices,
                        lambda *a: None, dataset=data_module.load("digits"))
    assert seen == [each]  # this process, while it runs its trials
    assert current == ([devices[0]] if devices[0].startswith("cuda") else [])
    assert [args[5] for args in started] == [each] * (len(devices) - 1)
    assert torch.get_num_threads() == threads  # given back after


def test_a_worker_makes_its_own_gpu_the_current_one(monkeypatch, tmp_path):
    """search.workers._worker, run in this process with what a worker on cuda:3 is given,
    sets cuda:3 as the current device before it builds anything."""
    import torch

    from search import objective as objective_module
    from search import workers
    from search.config import RunConfig

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    monkeypatch.setattr(workers.signal, "signal", lambda *args: None)
    monkeypatch.setattr(workers.logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setattr(workers, "_pull_trials", lambda *args: None)
    built = []
    monkeypatch.setattr(objective_module, "Objective",
                        lambda *args, **kwargs: built.append(list(current)))
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(storage=url, study_name="s")
    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    try:
        workers._worker(dataclasses.asdict(RunConfig(study="mlp", data="digits", storage=url)),
                        "s", "cuda:3", 1, 1, threads, None, dict(os.environ))
    finally:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    assert built == [["cuda:3"]]  # current before the objective was built


# trials that would train for minutes (10,000 epochs of digits, never pruned): only the
# deadline can end them
ENDLESS = ["--study", "mlp", "--data", "digits", "--epochs", "10000", "--pruner", "none",
           "--no-final"]


def _search_seconds(stderr: str) -> float:
    import re

    found = re.search(r"search done in (\d+)s \(--timeout (\S+)s\)", stderr)
    assert found, stderr[-2000:]
    return float(found.group(1))


# one worker trains within a second of the search's start; two start in a few seconds (the
# deadline counts them), so their timeout is longer
@pytest.mark.parametrize("workers,timeout", [("1", 3), ("2", 8)])
def test_the_search_ends_at_its_timeout_and_running_trials_stop_there(tmp_path, workers,
                                                                      timeout):
    db = tmp_path / "s.db"
    result = run_cli(*ENDLESS, "--workers", workers, "--timeout", str(timeout), "--storage",
                     f"sqlite:///{db}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _search_seconds(result.stderr) <= timeout + 10
    study = optuna.load_study(study_name="mlp-digits", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    # a trial drawn with a diverging learning rate ends on its own, before the deadline;
    # the others run until it, at most one per worker: none started after it
    stopped = [t for t in trials if "stopped" in t.user_attrs]
    assert len(stopped) <= int(workers), [t.user_attrs for t in trials]
    if workers == "1":
        assert trials  # this process's first trial starts at once
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.PRUNED
        if trial not in stopped:
            assert "nan" in trial.user_attrs["failure"], trial.user_attrs
            continue
        assert "--timeout reached" in trial.user_attrs["stopped"]
        if trial.intermediate_values:  # its value is its last score
            assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
    assert ("stopped at the deadline, pruned at their last score" in result.stderr) == bool(
        stopped)


def test_a_deadline_stops_training_within_its_first_batch(digits):
    import time

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from search import registry
    from search.errors import DeadlineReached
    from search.train import DeviceSplit, train_built
    from spaces import mlp as mlp_space

    built = registry.get("mlp").build(mlp_space.LECTURE, digits.image_shape, 10,
                                      digits.channel_mean, digits.channel_std)
    steps = []
    cpu = torch.device("cpu")
    train, val = DeviceSplit.of(digits.train, cpu), DeviceSplit.of(digits.val, cpu)
    hook = register_optimizer_step_post_hook(
        lambda *args: steps.append(1))
    try:
        with pytest.raises(DeadlineReached, match="in epoch 1"):
            train_built(built, train, val, epochs=50, batch_size=64, seed=0,
                        stop_at=time.time() - 1)
    finally:
        hook.remove()
    assert len(steps) == 1  # one optimizer step: stopped after the first batch
