"""One entry point from a storage URL to an Optuna storage: `storage.open(url)`.

Used by `python -m search.run --storage URL` (default `sqlite:///studies.db`). SQLite gets a
busy timeout and WAL journaling so several worker processes on one machine and a running
optuna-dashboard do not hit "database is locked"; every RDB storage gets heartbeats, and a
trial whose worker died is failed and retried. On a server database trials are read back
with plain SELECTs (storage.reads); a running trial's writes are grouped (storage.trials).
`grpc://HOST:PORT` reaches a database through Optuna's gRPC storage proxy
(`python -m search.proxy`), for more machines than the database takes connections.
"""

from __future__ import annotations

import functools
import sqlite3
import time
import warnings
from pathlib import Path

import optuna
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from search.errors import StorageError
from storage.reads import CoreReadStorage
from storage.trials import count_trials, params_later, write_trial

DEFAULT_URL = "sqlite:///studies.db"
SQLITE_BUSY_TIMEOUT_S = 60  # a writer waits this long for the lock before failing
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120  # a running trial with no heartbeat for this long is failed, then retried
MAX_RETRY = 2
CONNECT_TIMEOUT_S = 10  # an unreachable server is reported after this long
_EXAMPLES = ("e.g. sqlite:///studies.db, postgresql://user@host:5432/db or grpc://host:13000 "
             "(a python -m search.proxy)")
GRPC_SCHEME = "grpc://"


def grpc_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a grpc://HOST:PORT URL, None for a database URL. Raises StorageError
    when a grpc:// URL is not HOST:PORT."""
    if not url.startswith(GRPC_SCHEME):
        return None
    host, colon, port = url[len(GRPC_SCHEME):].rstrip("/").rpartition(":")
    if (not colon or not host or any(c in host for c in "/@ ") or not port.isdigit()
            or not 0 < int(port) < 65536):
        raise StorageError(f"storage URL {shown(url)!r}: expected grpc://HOST:PORT of a "
                           "running python -m search.proxy, e.g. grpc://127.0.0.1:13000")
    return host, int(port)


def parse(url: str) -> URL:
    """Raises StorageError when `url` is not an SQLAlchemy database URL."""
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 (a port that is not a number raises here, not later)
    except (ArgumentError, ValueError) as exc:
        why = "the port is not a number" if isinstance(exc, ValueError) else "malformed"
        raise StorageError(f"storage URL {shown(url)!r}: {why}; expected {_EXAMPLES}") from None
    if "@" in (parsed.host or ""):  # the database driver would echo the host it resolves
        raise StorageError(f"storage URL {shown(url)!r}: the password holds an '@'; write it "
                           "as %40 (URL-encoded), e.g. p%40ss for p@ss")
    try:
        parsed.get_dialect()
    except Exception:
        raise StorageError(
            f"storage URL {shown(url)!r}: unknown database kind {parsed.drivername!r}; "
            f"expected {_EXAMPLES}"
        ) from None
    return parsed


def shown(url: str) -> str:
    """`url` with its password replaced by ***, for logs, reports, study attributes and
    error messages. In a URL that does not parse, whatever follows "user:" up to the last
    "@" is hidden, and with no "@", whatever follows "name:" up to the path unless it is a
    port number: "postgresql://user:hunter2/db" (the host forgotten) is shown as
    "postgresql://user:***/db"."""
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 (a port that is not a number raises here)
        if "@" not in (parsed.host or ""):  # else a password with an unescaped "@" in it
            return parsed.render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        pass
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user, colon, _ = credentials.partition(":")
        return f"{scheme}://{user}:***@{host}" if colon else url
    netloc, slash, path = rest.partition("/")
    name, colon, after = netloc.partition(":")
    if not colon or after.isdigit():
        return url
    return f"{scheme}://{name}:***{slash}{path}"


def check(url: str) -> None:
    """Everything about `url` that can be checked without writing anything: it parses, an
    SQLite file's folder exists, and an existing SQLite file is an Optuna database of this
    Optuna's schema. Raises StorageError. `open` repeats it; `search.run` calls it first so
    that a run stopped by bad data or flags leaves no new database file behind. A grpc://
    URL is checked for its form only: the proxy is reached by `open`."""
    if grpc_address(url) is not None:
        return
    parsed = parse(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StorageError(f"storage URL {shown(url)!r} is an in-memory database: no trial "
                           "would be kept and workers could not share it; give a file, e.g. "
                           "sqlite:///studies.db")
    path = sqlite_path(url)
    if path is None:
        return
    display = parsed.render_as_string(hide_password=True)
    if not path.parent.is_dir():
        raise StorageError(f"storage {display}: directory {path.parent} does not exist; "
                           "create it first")
    if path.exists() and not path.is_file():
        raise StorageError(f"storage {display}: {path} is not a file")
    if not path.is_file() or path.stat().st_size == 0:
        return  # a new database
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                     timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = (connection.execute("SELECT version_num FROM alembic_version")
                        .fetchone() if "alembic_version" in tables else None)
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StorageError(f"storage {display}: {path} is not an SQLite database ({exc}); "
                           "give another file") from None
    if tables and not {"studies", "alembic_version"} <= tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(f"storage {display}: {path} is a database of another program "
                           f"(tables {listed}); Optuna would add its tables to it, so give "
                           "another file")
    head = _schema_head()
    if revision is not None and head is not None and revision[0] != head:
        raise StorageError(_old_schema(display, revision[0], head))


@functools.cache  # a constant of the installed Optuna: check() runs at every open()
def _schema_head() -> str | None:
    """The table schema revision this Optuna writes (None if Optuna's layout changed)."""
    try:
        from optuna.storages._rdb.storage import _VersionManager

        manager = object.__new__(_VersionManager)  # the head needs no database
        manager.url = "sqlite://"
        return manager.get_head_version()
    except Exception:  # a private API: without it, RDBStorage's own check still runs
        return None


def _old_schema(display: str, found: str, head: str) -> str:
    return (f"storage {display} has Optuna table schema {found!r}, this Optuna "
            f"({optuna.__version__}) uses {head!r}; back it up, then run `optuna storage "
            f"upgrade --storage {display}` (or give another database)")


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL, None for in-memory or other databases."""
    if grpc_address(url) is not None:
        return None
    parsed = parse(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


CREATE_RACE_RETRIES = 3


def _rdb_storage(url: str, engine_kwargs: dict, heartbeat_interval: int,
                 grace_period: int) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        # heartbeats are marked experimental in Optuna; they are what makes retry work
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        # SQLite: Optuna's reads. Every SQLite transaction here takes the write lock (BEGIN
        # IMMEDIATE, below), and a plain read on its own connection beside Optuna's
        # thread-local session stalled a worker for the busy timeout in 3 of ~40 runs of
        # test_several_processes_share_one_study; never with Optuna's reads
        kind = (optuna.storages.RDBStorage if make_url(url).get_backend_name() == "sqlite"
                else CoreReadStorage)
        return kind(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period, heartbeat_stale_trial_callback=retry)


def open(  # noqa: A001 (storage.open is the name the design gives it)
    url: str = DEFAULT_URL,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
    grace_period: int = GRACE_PERIOD_S,
) -> optuna.storages.BaseStorage:
    """An RDB storage for `url`, created if needed. A trial whose worker stops sending
    heartbeats (every `heartbeat_interval` s) for `grace_period` s is failed and enqueued
    again, up to MAX_RETRY times.

    A grpc:// URL gives Optuna's GrpcStorageProxy: the proxy holds the database and its
    settings; heartbeats do not pass through it.

    Raises StorageError when the URL is malformed, the SQLite directory is missing, or the
    database (or proxy) cannot be reached.
    """
    address = grpc_address(url)
    if address is not None:
        return _grpc_proxy(*address)
    check(url)
    parsed = parse(url)
    display = parsed.render_as_string(hide_password=True)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True  # survive a server restart between trials
        if parsed.get_backend_name() == "postgresql":
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        for attempt in range(CREATE_RACE_RETRIES + 1):
            try:
                opened = _rdb_storage(url, engine_kwargs, heartbeat_interval, grace_period)
                break
            except SQLAlchemyError as exc:
                # machines creating Optuna's tables in one new PostgreSQL database at the
                # same instant: one wins, the others' CREATE TABLE collides in pg_type;
                # the tables exist a moment later
                if attempt == CREATE_RACE_RETRIES or "pg_type_typname_nsp_index" not in str(exc):
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (SQLAlchemyError, ImportError, sqlite3.Error, RuntimeError) as exc:
        text = str(getattr(exc, "orig", None) or exc).strip()
        if "storage upgrade" in text:  # RDBStorage's schema check on a server database
            raise StorageError(_old_schema(display, "older", "this one's")) from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise StorageError(f"cannot open storage {display}: {first}") from None
    path = sqlite_path(url)
    if path is not None:
        _enable_wal(path, display)
    if parsed.get_backend_name() == "sqlite":
        _begin_immediate(opened.engine)
    return opened


def _grpc_proxy(host: str, port: int) -> optuna.storages.BaseStorage:
    try:
        import grpc  # noqa: F401 (Optuna imports it lazily, at the first call)
        from optuna.storages import GrpcStorageProxy
    except ImportError:
        raise StorageError("a grpc:// storage needs grpcio and protobuf: pip install "
                           "'optuna-search[grpc]' (or pip install grpcio protobuf)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=CONNECT_TIMEOUT_S)
    except Exception:  # grpc.FutureTimeoutError, or a host that does not resolve
        raise StorageError(f"cannot reach the storage proxy at {GRPC_SCHEME}{host}:{port} "
                           f"within {CONNECT_TIMEOUT_S} s; start it on that machine with "
                           f"python -m search.proxy --storage DATABASE_URL --port {port}"
                           ) from None
    return proxy


def _begin_immediate(engine) -> None:
    # Optuna claims a queued (WAITING) trial with SELECT ... FOR UPDATE, which SQLite
    # ignores: two processes can both read WAITING and both run the trial. Starting every
    # transaction with BEGIN IMMEDIATE takes the write lock before that read, so a queued
    # trial is popped once. Readers in other processes (optuna-dashboard) are not blocked
    # under WAL.
    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not BEGIN (DEFERRED) itself

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed are dropped


def _enable_wal(path: Path, display: str) -> None:
    # WAL is a property of the database file: set once, every later connection uses it,
    # and readers (optuna-dashboard) no longer block the writers.
    try:
        connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open storage {display}: {exc}") from None


def artifact_dir(url: str, directory: str | Path | None = None) -> Path:
    """Where the final models and reports are stored as Optuna artifacts: `directory` if
    given, else beside an SQLite database (studies.db -> studies-artifacts/), else
    ./artifacts. optuna-dashboard shows them with --artifact-dir pointing here."""
    return _beside(url, directory, "artifacts")


def cache_dir(url: str, directory: str | Path | None = None) -> Path:
    """Where work shared by many trials is cached (augmented copies, frozen features):
    `directory` if given, else beside an SQLite database (studies.db -> studies-cache/),
    else ./cache. Nothing is created here."""
    return _beside(url, directory, "cache")


def _beside(url: str, directory: str | Path | None, kind: str) -> Path:
    """`directory`, else <db stem>-<kind>/ beside an SQLite file, else ./<kind>."""
    if directory is not None:
        return Path(directory)
    path = sqlite_path(url)
    if path is not None:
        return path.parent / f"{path.stem}-{kind}"
    return Path(kind)


def artifact_store(url: str, directory: str | Path | None = None):
    """A file-system artifact store for the storage at `url` (see artifact_dir)."""
    from optuna.artifacts import FileSystemArtifactStore

    base = artifact_dir(url, directory)
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(base))


__all__ = ["DEFAULT_URL", "artifact_dir", "artifact_store", "cache_dir", "check", "count_trials",
           "grpc_address", "open", "params_later", "parse", "shown", "sqlite_path",
           "write_trial"]
