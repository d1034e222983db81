"""python -m search.proxy --storage postgresql://USER@HOST/DB [--host 127.0.0.1] [--port 13000]

Serves one study database to many machines through Optuna's gRPC storage proxy: every
machine runs `python -m search.run ... --storage grpc://PROXY_HOST:13000` and talks to this
process, which alone holds connections to the database (with the same settings as a direct
--storage URL). Use it when more machines share a study than the database takes
connections. The proxy has no login: anyone who reaches its port can read and change every
study, so keep it on a private network (--host 0.0.0.0 only there). Heartbeats do not pass
through it: a machine that dies leaves its running trials RUNNING (python -m search.final
then finishes the study).
"""

from __future__ import annotations

import logging
import socket
import sys
import warnings

import optuna

import storage
from search.cli import Parser, describe, run_command, setup_logging
from search.errors import ConfigError

log = logging.getLogger("search")

DEFAULT_PORT = 13000  # Optuna's own default for its proxy
MAX_THREADS = 1024


def build_parser() -> Parser:
    parser = Parser(prog="python -m search.proxy", description=describe(__doc__))
    parser.add_argument("--storage", default=storage.DEFAULT_URL, metavar="URL",
                        help="the database the proxy serves, an SQLAlchemy URL (as "
                        "search.run's --storage)")
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST",
                        help="address to listen on: 127.0.0.1 for this machine only, the "
                        "private network's address (or 0.0.0.0) for other machines")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                        help="port to listen on")
    parser.add_argument("--threads", type=int, default=10, metavar="N",
                        help="requests served at once")
    return parser


def check(url: str, host: str, port: int, threads: int) -> None:
    """Everything that can be refused before serving. Raises ConfigError."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535, got {port}")
    if not 0 < threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be from 1 to {MAX_THREADS:,}, got {threads}")
    if storage.grpc_address(url) is not None:
        raise ConfigError(f"--storage {storage.shown(url)}: give the database's URL "
                          "(sqlite:///FILE, postgresql://...), not another proxy's")
    storage.check(url)
    try:
        with socket.create_server((host, port)):  # free and ours to take, checked first
            pass
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                          "give another --port or --host") from None


def serve(url: str, host: str, port: int, threads: int) -> None:
    """Serve `url` on host:port until interrupted. Raises ConfigError (StorageError)."""
    from concurrent.futures import ThreadPoolExecutor

    check(url, host, port, threads)
    opened = optuna.storages.get_storage(storage.open(url))  # Optuna's cache in front
    log.info("storage proxy: serving %s on grpc://%s:%d; on each machine: python -m "
             "search.run ... --storage grpc://%s:%d", storage.shown(url), host, port,
             "THIS_HOST" if host in ("0.0.0.0", "::") else host, port)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            optuna.storages.run_grpc_proxy_server(
                opened, host=host, port=port, thread_pool=ThreadPoolExecutor(threads))
        except RuntimeError as exc:  # grpcio could not bind after all
            raise ConfigError(f"cannot listen on {host}:{port} ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run_command(lambda: serve(args.storage, args.host, args.port, args.threads),
                       "the proxy stopped; trials the machines finish from now on are not "
                       "stored until it runs again")


if __name__ == "__main__":
    sys.exit(main())
