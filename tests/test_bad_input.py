"""Bad input, one table: every flag and every file the service reads.

Each row runs a real entry point (`search.run`, `search.final`, `search.evaluate`) in this
process and checks what the user sees and what is left behind: exit code 2, exactly one line
on stderr that says what is wrong, no traceback, no password, and every file and folder under
the working directory (storage, runs, artifacts, caches) byte-for-byte as it was, with no new
database file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import storage
from search import evaluate as evaluate_module
from search import final as final_module
from search import proxy as proxy_module
from search import replay as replay_module
from search import run as run_module
from search.export import sha256_of
from spaces import mlp as mlp_space
from tests.test_data import write_mnist_dir
from tests.test_images import colour_folder, npz_file

SECRET = "hunter2-secret"
RUN = ["--study", "mlp", "--data", "digits", "--n-trials", "1", "--epochs", "1"]


@dataclass(frozen=True)
class Row:
    name: str
    argv: list[str]
    says: str  # a fragment of the one line the user must see
    setup: Callable[[Path], None] | None = None
    cli: str = "run"  # a key of MAINS
    needs_postgres: bool = False


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under `root`. SQLite's -shm is a shared-memory
    index rebuilt from the database, and an empty -wal holds nothing: neither is data."""
    seen = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_dir():
            seen[name] = "folder"
        elif not (name.endswith("-shm") or (name.endswith("-wal") and not path.stat().st_size)):
            seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


# --- what a row's setup writes before the bad run --------------------------------------------

def _study_db(root: Path, *, name="mlp-digits", direction="maximize", metrics=None,
              **attrs) -> None:
    """studies.db holding one study made by this service with `attrs` changed; `direction`
    one or a list, `metrics` the names of its objectives."""
    opened = storage.open(f"sqlite:///{root / 'studies.db'}")
    study = optuna.create_study(storage=opened, study_name=name, directions=(
        [direction] if isinstance(direction, str) else direction))
    if metrics is not None:
        study.set_metric_names(metrics)
    made = {"study": "mlp", "space_version": mlp_space.VERSION,
            "data": {"dataset": "digits", "n_train": 1149, "n_val": 288, "split_seed": 20240}}
    for key, value in {**made, **attrs}.items():
        study.set_user_attr(key, value)
    opened.engine.dispose()  # closed as a finished run leaves it


def _sqlite_of_another_program(root: Path) -> None:
    with sqlite3.connect(root / "studies.db") as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        connection.execute("INSERT INTO invoices VALUES (1, 9.5)")
    connection.close()


def _older_optuna_schema(root: Path) -> None:
    _study_db(root)
    with sqlite3.connect(root / "studies.db") as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    connection.close()


def _write(relative: str, content: bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return setup


def _idx(change: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """A valid IDX folder idx/ (300 train / 100 test images), then `change` applied to it."""
    def setup(root: Path) -> None:
        write_mnist_dir(root / "idx")
        if change is not None:
            change(root / "idx")
    return setup


def _truncate(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return change


def _model(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """model/ holding the shared saved model's model.pt + model.json, then `change`."""
    def setup(root: Path) -> None:
        (root / "model").mkdir()
        for name in ("model.pt", "model.json"):
            shutil.copy(SAVED_MODEL / name, root / "model" / name)
        change(root / "model")
    return setup


def _json(**changes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        info = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps({**info, **changes}))
    return change


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def _pickle_that_runs_code(folder: Path) -> None:
    torch.save({"weights": _RunsCode()}, folder / "model.pt")
    _json(sha256=sha256_of(folder / "model.pt"))(folder)  # an attacker can fix the digest


def _widths_changed(folder: Path) -> None:
    info = json.loads((folder / "model.json").read_text())
    _json(params={**info["params"], "n_units_l0": info["params"]["n_units_l0"] + 1})(folder)


# --- the table -------------------------------------------------------------------------------

NUMERIC = ("--n-trials", "--max-trials", "--timeout", "--epochs", "--batch-size", "--seed",
           "--workers", "--workers-per-device", "--final-seeds", "--final-epochs",
           "--final-patience", "--input-size", "--max-params", "--max-flops", "--front-models")


IMAGES = ["--study", "cnn", "--n-trials", "1", "--epochs", "1", "--data", "imgs"]


def _folder(edit: Callable[[Path], None] | None = None, per_class: int = 4):
    """A setup: a small colour image folder imgs/, then `edit(imgs)`."""
    def setup(root: Path) -> None:
        folder = colour_folder(root / "imgs", per_class=per_class, mixed=False)
        if edit is not None:
            edit(folder)
    return setup


def _npz(**arrays):
    """A setup: imgs.npz holding a valid set with `arrays` replacing or removing (None)
    its arrays."""
    def setup(root: Path) -> None:
        with np.load(npz_file(root / "valid.npz")) as valid:
            content = {**dict(valid), **arrays}
        (root / "valid.npz").unlink()
        np.savez(root / "imgs.npz", **{k: v for k, v in content.items() if v is not None})
    return setup


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data: what a
    decompression bomb looks like before it is inflated."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _truncated_png(folder: Path) -> None:
    good = (folder / "red" / "1.png").read_bytes()
    (folder / "red" / "1.png").write_bytes(good[:len(good) // 2])


def _numeric_rows() -> list[Row]:
    rows = []
    for flag in NUMERIC:
        values = ["0", "-1", "1000000000000", "many"]
        if flag in ("--seed", "--final-patience"):
            values.remove("0")  # seed 0 is the default; patience 0 never stops early
        if flag == "--timeout":
            values += ["nan", "inf"]
        for value in values:
            rows.append(Row(f"{flag}={value}", [*RUN, flag, value], flag))
    # fractional flags: milliseconds, an accuracy
    for flag, values in (("--max-latency-ms", ["0", "-1", "nan", "inf", "1e9", "many"]),
                         ("--front-floor", ["1", "-0.5", "nan", "many"])):
        rows += [Row(f"{flag}={value}", [*RUN, flag, value], flag) for value in values]
    return rows


ROWS = [
    *_numeric_rows(),
    # names: study, data, sampler, pruner, device
    Row("unknown study", ["--study", "resnet"], "unknown study 'resnet'"),
    Row("no study", [], "the following arguments are required: --study"),
    Row("unknown data", [*RUN, "--data", "cifar"], "unknown data set 'cifar'"),
    Row("unknown sampler", [*RUN, "--sampler", "cmaes"], "invalid choice: 'cmaes'"),
    Row("unknown pruner", [*RUN, "--pruner", "asha"], "invalid choice: 'asha'"),
    Row("unknown latency runtime", [*RUN, "--latency-runtime", "tensorrt"],
        "invalid choice: 'tensorrt'"),
    *[Row(f"objectives {o!r}", [*RUN, "--objectives", o], "give accuracy, then any of")
      for o in ("params", "accuracy,size", "accuracy,params,params", "", "params,accuracy")],
    Row("pareto search with a one-objective pruner",
        [*RUN, "--objectives", "accuracy,flops", "--pruner", "median"],
        "--pruner median ranks one objective"),
    Row("unknown references mode", [*RUN, "--references", "some"], "invalid choice: 'some'"),
    Row("workers and workers per device", [*RUN, "--workers", "2", "--workers-per-device", "2"],
        "not both"),
    *[Row(f"device {d}", [*RUN, f"--device={d}"], "--device")
      for d in ("gpu", "meta", "mps", "xla", "cpu:1", "cuda:99", "", "cuda:-1")],
    *([] if torch.cuda.is_available() else
      [Row("device cuda without a GPU", [*RUN, "--device", "cuda"], "no CUDA GPU is visible")]),
    # study names become folders: nothing may point outside --runs-dir
    *[Row(f"study name {n!r}", [*RUN, f"--study-name={n}"], "study name")
      for n in ("../escape", "a/b", "/abs", ".hidden", "-dash", " ", "x" * 101, "a\nb")],
    Row("runs dir not writable", [*RUN, "--runs-dir", "/proc/runs"], "--runs-dir"),
    Row("artifact dir is a file", [*RUN, "--artifact-dir", "afile"], "is not a folder",
        _write("afile", b"x")),
    Row("cache dir not writable", [*RUN, "--cache-dir", "/proc/cache"], "--cache-dir"),
    Row("weights file missing", ["--study", "vgg16", "--weights", "nothing.pth"], "nothing.pth"),
    Row("weights not torch", ["--study", "vgg16", "--weights", "w.pth"], "w.pth",
        _write("w.pth", b"\x80\x02not a checkpoint")),
    Row("runs dir is a file", [*RUN, "--runs-dir", "afile/runs"], "is not a folder",
        _write("afile", b"x")),
    # storage URLs, malformed in every part, unreachable, or not an Optuna database
    Row("cache bound zero", [*RUN, "--cache-max-gb", "0"], "--cache-max-gb must be from 0.01"),
    Row("cache bound not a number", [*RUN, "--cache-max-gb", "lots"], "invalid float value"),
    Row("cache bound nan", [*RUN, "--cache-max-gb", "nan"], "--cache-max-gb must be from"),
    Row("storage scheme", [*RUN, "--storage", "postgres://u@h/db"], "unknown database kind"),
    Row("storage driver", [*RUN, "--storage", "mysql+nodriver://x"], "unknown database kind"),
    Row("storage empty", [*RUN, "--storage", ""], "malformed"),
    Row("storage port", [*RUN, "--storage", f"postgresql://u:{SECRET}@127.0.0.1:port/db"],
        "the port is not a number"),
    Row("storage host forgotten", [*RUN, "--storage", f"postgresql://u:{SECRET}/db"],
        "storage URL 'postgresql://u:***/db': the port is not a number"),
    Row("storage scheme with a password", [*RUN, "--storage", f"postgres://u:{SECRET}@h/db"],
        "storage URL 'postgres://u:***@h/db': unknown database kind"),
    Row("storage password with an @", [*RUN, "--storage",
                                       f"postgresql://u:p@{SECRET}@127.0.0.1:1/db"],
        "storage URL 'postgresql://u:***@127.0.0.1:1/db': the password holds an '@'"),
    Row("storage port range", [*RUN, "--storage",
                               f"postgresql://u:{SECRET}@127.0.0.1:99999/db"], "port"),
    Row("storage host", [*RUN, "--storage", f"postgresql://u:{SECRET}@no-such-host.invalid/db"],
        "cannot open storage"),
    Row("storage unreachable", [*RUN, "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/db"],
        "cannot open storage"),
    Row("storage user", [*RUN, "--storage", f"postgresql://nobody:{SECRET}@127.0.0.1:5432/test"],
        'role "nobody" does not exist', needs_postgres=True),
    Row("storage database", [*RUN, "--storage",
                             f"postgresql://postgres:{SECRET}@127.0.0.1:5432/no_such_db"],
        'database "no_such_db" does not exist', needs_postgres=True),
    Row("storage in memory", [*RUN, "--storage", "sqlite://"], "in-memory database"),
    Row("storage folder missing", [*RUN, "--storage", "sqlite:///no/such/dir.db"],
        "directory no/such does not exist"),
    Row("storage not a database", [*RUN, "--storage", "sqlite:///studies.db"],
        "is not an SQLite database", _write("studies.db", b"name,score\nada,1\n" * 50)),
    Row("storage of another program", [*RUN, "--storage", "sqlite:///studies.db"],
        "is a database of another program (tables invoices)", _sqlite_of_another_program),
    Row("storage older optuna", [*RUN, "--storage", "sqlite:///studies.db"],
        "optuna storage upgrade", _older_optuna_schema),
    # an existing study of another kind, space version, direction or data
    Row("study of another kind", RUN, "was made with study 'cnn'",
        lambda root: _study_db(root, study="cnn")),
    Row("study of another space", RUN, "space_version 'mlp-v0'",
        lambda root: _study_db(root, space_version="mlp-v0")),
    Row("study that minimizes", RUN, "exists with directions minimize; this run needs maximize",
        lambda root: _study_db(root, direction="minimize")),
    Row("study of one objective, run with two", [*RUN, "--objectives", "accuracy,params"],
        "exists with directions maximize; this run needs maximize, minimize", _study_db),
    Row("study of accuracy against parameters, run against multiply-adds",
        [*RUN, "--objectives", "accuracy,flops"], "exists with objectives validation accuracy, "
        "parameters; this run needs validation accuracy, multiply-adds per image",
        lambda root: _study_db(root, direction=["maximize", "minimize"],
                               metrics=["validation accuracy", "parameters"])),
    Row("study on other data", RUN, "was made on digits (n_train=999)",
        lambda root: _study_db(root, data={"dataset": "digits", "n_train": 999,
                                           "n_val": 288, "split_seed": 20240})),
    # data folders: missing, truncated, mismatched, corrupt; and the Keras cache on auto
    Row("data dir missing", [*RUN, "--data", "mnist", "--data-dir", "nowhere"],
        "data directory nowhere does not exist"),
    Row("idx file missing", [*RUN, "--data", "mnist", "--data-dir", "idx"],
        "missing t10k-labels-idx1-ubyte",
        _idx(lambda d: (d / "t10k-labels-idx1-ubyte").unlink())),
    Row("idx truncated", [*RUN, "--data", "mnist", "--data-dir", "idx"],
        "train-images-idx3-ubyte: header says", _idx(_truncate("train-images-idx3-ubyte"))),
    Row("idx counts mismatch", [*RUN, "--data", "mnist", "--data-dir", "idx"],
        "has 100 images but",
        _idx(lambda d: write_mnist_dir(d / "other", n_test=50)
             and None or shutil.move(d / "other" / "t10k-labels-idx1-ubyte",
                                     d / "t10k-labels-idx1-ubyte"))),
    Row("idx not idx", [*RUN, "--data", "mnist", "--data-dir", "idx"], "not an IDX file",
        _idx(lambda d: (d / "train-labels-idx1-ubyte").write_bytes(b"<html>404</html>"))),
    Row("idx corrupt gzip", [*RUN, "--data", "mnist", "--data-dir", "idx"], "corrupt gzip",
        _idx(lambda d: ((d / "train-labels-idx1-ubyte").unlink(),
                        (d / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08junk")))),
    Row("idx one class", [*RUN, "--data", "mnist", "--data-dir", "idx"],
        "a validation split needs at least 2",
        _idx(lambda d: write_mnist_dir(d, n_train=1))),
    Row("keras npz corrupt", ["--study", "mlp", "--n-trials", "1"], "mnist.npz: cannot read",
        _write("no-keras/datasets/mnist.npz", b"PK\x03\x04 this is not a zip")),
    Row("keras npz wrong arrays", ["--study", "mlp", "--n-trials", "1"],
        "not the Keras MNIST layout",
        lambda root: np.savez(_parent(root / "no-keras/datasets/mnist.npz"), x=np.zeros(3))),
    # search.final
    Row("final: no database", ["--study-name", "nope"], "no database studies.db", cli="final"),
    Row("final: unknown study", ["--study-name", "nope"], "no study 'nope'", cli="final",
        setup=_study_db),
    Row("final: study name", ["--study-name", "../up"], "study name", cli="final",
        setup=lambda root: _study_db(root, name="../up")),
    Row("final: seeds", ["--study-name", "mlp-digits", "--final-seeds", "0"], "--final-seeds",
        cli="final", setup=_study_db),
    Row("final: epochs", ["--study-name", "mlp-digits", "--final-epochs", "0"],
        "--final-epochs", cli="final", setup=_study_db),
    Row("final: patience", ["--study-name", "mlp-digits", "--final-patience", "-1"],
        "--final-patience", cli="final", setup=_study_db),
    Row("final: front models", ["--study-name", "mlp-digits", "--front-models", "0"],
        "--front-models", cli="final", setup=_study_db),
    Row("final: front floor", ["--study-name", "mlp-digits", "--front-floor", "1.5"],
        "--front-floor", cli="final", setup=_study_db),
    Row("final: no trials", ["--study-name", "mlp-digits"], "no completed trial", cli="final",
        setup=_study_db),
    Row("final: older space", ["--study-name", "mlp-digits"], "searched in space mlp-v0",
        cli="final", setup=lambda root: _study_db(root, space_version="mlp-v0")),
    Row("replay: older space", ["--study-name", "mlp-digits", "--trial", "0"],
        "searched in space mlp-v0", cli="replay",
        setup=lambda root: _study_db(root, space_version="mlp-v0")),
    Row("final: data dir", ["--study-name", "mlp-digits", "--data-dir", "no/such"],
        "data directory no/such does not exist", cli="final", setup=_study_db),
    Row("final: device", ["--study-name", "mlp-digits", "--device", "tpu"], "--device 'tpu'",
        cli="final", setup=_study_db),
    Row("final: runs dir not writable", ["--study-name", "mlp-digits", "--runs-dir",
                                         "/proc/runs"], "--runs-dir /proc/runs: cannot write",
        cli="final", setup=_study_db),
    Row("final: artifact dir is a file", ["--study-name", "mlp-digits", "--artifact-dir",
                                          "studies.db"], "studies.db is not a folder",
        cli="final", setup=_study_db),
    Row("final: storage", ["--study-name", "x", "--storage", "sqlite:///studies.db"],
        "is not an SQLite database", _write("studies.db", b"\x00" * 4096), cli="final"),
    # search.replay
    Row("replay: no database", ["--study-name", "x", "--trial", "0"], "no database",
        cli="replay"),
    Row("replay: no such trial", ["--study-name", "mlp-digits", "--trial", "7"],
        "has no trial 7", cli="replay", setup=_study_db),
    Row("replay: trial not a number", ["--study-name", "x", "--trial", "last"],
        "invalid int value", cli="replay"),
    Row("replay: device", ["--study-name", "mlp-digits", "--trial", "0", "--device", "tpu"],
        "--device", cli="replay", setup=_study_db),
    Row("replay: data dir", ["--study-name", "mlp-digits", "--trial", "0", "--data-dir",
                             "no/such"], "data directory no/such does not exist", cli="replay",
        setup=_study_db),
    Row("replay: storage", ["--study-name", "x", "--trial", "0", "--storage",
                            f"postgresql://u:{SECRET}/db"], "the port is not a number",
        cli="replay"),
    # search.evaluate: model.pt / model.json truncated, mismatched, unsafe
    Row("model missing", ["model/model.pt"], "no such file", cli="evaluate"),
    Row("model truncated", ["model/model.pt"], "sha256", _model(_truncate("model.pt")),
        cli="evaluate"),
    Row("model json broken", ["model/model.pt"], "not valid JSON",
        _model(lambda d: (d / "model.json").write_text("{not json")), cli="evaluate"),
    Row("model json missing", ["model/model.pt"], "model.json: missing",
        _model(lambda d: (d / "model.json").unlink()), cli="evaluate"),
    Row("model of another architecture", ["model/model.pt"], "does not fit the architecture",
        _model(_widths_changed), cli="evaluate"),
    Row("model pickle runs code", ["model/model.pt"], "refused: it holds pickled objects",
        _model(_pickle_that_runs_code), cli="evaluate"),
    Row("model on other data", ["model/model.pt", "--data", "mnist-5k"], "takes 1x8x8 images",
        _model(lambda d: None), cli="evaluate"),
    Row("model on a folder of other images", ["model/model.pt", "--data", "imgs"],
        "predicts 10 classes", lambda root: [_model(lambda d: None)(root), _folder(
            lambda d: [p.unlink() for p in d.glob("*/*.txt")])(root)], cli="evaluate"),
    Row("model data dir", ["model/model.pt", "--data-dir", "no/such"],
        "data directory no/such does not exist", _model(lambda d: None), cli="evaluate"),
    # --data PATH: your own images, a folder or an .npz
    Row("image options with a named set", [*RUN, "--image-size", "32"],
        "apply to your own images"),
    Row("image size too small", [*IMAGES, "--image-size", "4"], "--image-size must be from 8",
        _folder()),
    Row("image size not a number", [*IMAGES, "--image-size", "big"], "--image-size"),
    Row("channels", [*IMAGES, "--channels", "2"], "--channels must be 1", _folder()),
    Row("test fraction", [*IMAGES, "--test-fraction", "0.9"], "--test-fraction must be",
        _folder()),
    Row("no such images", [*IMAGES[:-1], "no/such"], "no such folder or .npz file"),
    Row("not an image", IMAGES, "bad.png: not an image Pillow can read", _folder(
        lambda d: (d / "red" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnothing"))),
    Row("truncated image", IMAGES, "1.png: cannot decode", _folder(_truncated_png)),
    Row("decompression bomb", IMAGES, "too large to decode safely", _folder(
        lambda d: (d / "red" / "bomb.png").write_bytes(_png_claiming(60_000, 60_000)))),
    Row("empty class folder", IMAGES, "class folder with no images", _folder(
        lambda d: (d / "violet").mkdir())),
    Row("one class", IMAGES, "at least 2 classes", _folder(
        lambda d: [shutil.rmtree(d / c) for c in ("green", "blue")])),
    Row("too few images of a class", IMAGES, "class red has 2 images", _folder(
        lambda d: [(d / "red" / f"{i}.png").unlink() for i in (1, 2)])),
    Row("test class not trained", IMAGES, "no counterpart", lambda root: [
        _folder()(root / "train_"), (root / "imgs" / "test" / "violet").mkdir(parents=True),
        (root / "train_" / "imgs").rename(root / "imgs" / "train"), (root / "train_").rmdir()]),
    Row("npz labels do not match images", [*IMAGES[:-1], "imgs.npz"], "integer labels, one "
        "per image", _npz(y_train=np.zeros(3, np.int64))),
    Row("npz float images", [*IMAGES[:-1], "imgs.npz"], "expected uint8",
        _npz(x_test=np.zeros((15, 12, 12, 3), np.float32))),
    Row("npz missing arrays", [*IMAGES[:-1], "imgs.npz"], "missing array y_test",
        _npz(y_test=None)),
    Row("npz too few class names", [*IMAGES[:-1], "imgs.npz"], "class_names",
        _npz(class_names=np.array(["one"]))),
    Row("npz not a zip", [*IMAGES[:-1], "imgs.npz"], "cannot read as .npz",
        lambda root: (root / "imgs.npz").write_bytes(b"PK not really")),
    # search.proxy: what it would serve and where it would listen
    Row("proxy: port", ["--port", "0"], "--port must be from 1", cli="proxy"),
    Row("proxy: threads", ["--threads", "0"], "--threads must be from 1", cli="proxy"),
    Row("proxy: of a proxy", ["--storage", "grpc://127.0.0.1:13000"], "not another proxy's",
        cli="proxy"),
    Row("proxy: storage", ["--storage", f"postgresql://u:{SECRET}/db"],
        "the port is not a number", cli="proxy"),
    Row("proxy: host", ["--host", "no.such.host.invalid", "--port", "13999"],
        "cannot listen on no.such.host.invalid:13999", cli="proxy"),
    Row("run: grpc storage", [*RUN, "--storage", "grpc://127.0.0.1"],
        "expected grpc://HOST:PORT"),
]


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


SAVED_MODEL: Path = Path()


@pytest.fixture(scope="module", autouse=True)
def saved_model(tmp_path_factory):
    """One real model.pt + model.json (mlp on digits) for the evaluate rows."""
    global SAVED_MODEL
    root = tmp_path_factory.mktemp("model")
    cfg = run_module.RunConfig(study="mlp", data="digits", n_trials=2, epochs=1,
                               storage=f"sqlite:///{root / 'studies.db'}", final_seeds=1,
                               runs_dir=str(root / "runs"))
    study, opened, dataset = run_module.search(cfg)
    final_module.run_final(study, cfg, opened, dataset)
    SAVED_MODEL = root / "runs" / "mlp-digits"
    return SAVED_MODEL


MAINS = {"run": run_module.main, "final": final_module.main, "evaluate": evaluate_module.main,
         "replay": replay_module.main, "proxy": proxy_module.main}


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(row, tmp_path, capsys, request):
    if row.needs_postgres:
        request.getfixturevalue("postgres_url")  # skips (or fails in CI) without a server
    if row.setup is not None:
        row.setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = MAINS[row.cli](row.argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert row.says in lines[0], lines[0]
    assert SECRET not in err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


def test_the_table_covers_every_flag_of_every_command():
    """A flag added to any of the commands without a row of its own command here fails
    this test (matched as a whole argument: --seed is not covered by --final-seeds)."""
    parsers = {"run": run_module.build_parser(), "final": final_module.build_parser(),
               "evaluate": evaluate_module.build_parser(),
               "replay": replay_module.build_parser(),
               "proxy": proxy_module.build_parser()}
    assert set(parsers) == set(MAINS)
    missing = []
    for cli, parser in parsers.items():
        given = {arg.split("=")[0] for row in ROWS if row.cli == cli for arg in row.argv}
        for action in parser._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            if flag is None or action.nargs == 0:  # --help, --no-final: nothing to get wrong
                continue
            if flag not in given:
                missing.append(f"{cli} {flag}")
    assert not missing, f"no bad-input row for {', '.join(missing)}"
