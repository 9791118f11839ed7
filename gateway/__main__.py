"""``python -m gateway``: serve the gateway with uvicorn (uvloop, httptools).

The gateway's settings come from ``GATEWAY_*`` environment variables (``gateway.settings``);
these options are about serving: where to listen, how many worker processes, and how HTTP
connections behave behind a proxy such as the nginx of ``deploy/nginx``.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway import logs
from gateway.metrics import MULTIPROC_ENV
from gateway.server import gateway_config, run
from gateway.settings import Settings, describe_errors, unknown_names
from gateway.workers import metrics_dir, serve_workers

APP = "gateway.app:from_env"

KEEP_ALIVE_S = 75
"""Default ``--timeout-keep-alive``: above nginx's idle upstream connection timeout (60 s in
``deploy/nginx``), so that nginx, never the gateway, closes an idle connection. Otherwise
nginx may send a request on a connection the gateway is closing, and the client gets a 502."""

def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    where = p.add_argument_group("where to listen")
    where.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    where.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    where.add_argument("--uds", metavar="PATH", type=Path,
                       help="listen on this unix socket instead of --host/--port (an nginx "
                            "sidecar); its directory must exist and be writable")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="worker processes sharing the socket (default: %(default)s); with more "
                        f"than one, /metrics reports the server's totals (multiprocess files "
                        f"in a directory of the server's own under ${MULTIPROC_ENV} or the "
                        f"temp dir, removed on exit)")
    p.add_argument("--timeout-worker-healthcheck", type=_positive_int, default=5, metavar="S",
                   help="with --workers above 1: a worker whose event loop sends no heartbeat "
                        "for S seconds is killed and replaced (default: %(default)s)")
    http = p.add_argument_group("HTTP connections")
    http.add_argument("--timeout-keep-alive", type=_positive_int, default=KEEP_ALIVE_S,
                      metavar="S", help="close an idle connection after S seconds; keep it "
                                        "above the proxy's upstream keepalive_timeout "
                                        "(default: %(default)s)")
    http.add_argument("--proxy-headers", action=argparse.BooleanOptionalAction, default=True,
                      help="take the client address and scheme from X-Forwarded-For/-Proto "
                           "sent by a trusted proxy (default: on)")
    http.add_argument("--forwarded-allow-ips", metavar="IPS",
                      help="comma-separated proxy addresses trusted for X-Forwarded-*, '*' for "
                           "any (a unix socket peer has no address: use '*' with --uds); "
                           "default: $FORWARDED_ALLOW_IPS or 127.0.0.1")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def socket_path_error(path: Path) -> str | None:
    """Why a unix socket cannot be served at ``path``, or None if it can.

    An existing socket there is replaced (a previous server's); anything else is refused. A
    missing path is checked by binding a socket to it and removing it again.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            return f"{path} exists and is not a socket"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"{path}: directory {path.parent} is not writable"
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(str(path))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            return (f"cannot create a socket at {path}: {reason} (its directory must exist "
                    f"and be writable)")
    path.unlink()
    return None


def address_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not an address of this host), or None:
    checked by binding it once, before any model is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def load_settings() -> Settings:
    """Settings from the environment; a bad one, or a ``GATEWAY_*`` variable that names no
    setting, ends the process with one line per problem (the variable, its value with
    credentials redacted, what is expected) and status 2."""
    problems = unknown_names(os.environ)
    try:
        settings = Settings()
        problems += settings.problems()
    except ValidationError as exc:
        problems += describe_errors(exc)
    if problems:
        for line in problems:
            print(f"python -m gateway: {line}", file=sys.stderr)
        raise SystemExit(2)
    return settings


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.uds is not None:
        error = socket_path_error(args.uds)
        if error is not None:
            p.error(f"--uds: {error}")
    else:
        error = address_error(args.host, args.port)
        if error is not None:  # not a usage error: one line, no usage text
            print(f"python -m gateway: {error}", file=sys.stderr)
            raise SystemExit(2)
    settings = load_settings()
    options: dict[str, Any] = {
        "log_level": args.log_level,
        "timeout_keep_alive": args.timeout_keep_alive,
        "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": args.forwarded_allow_ips,
    }
    if args.uds is not None:
        options["uds"] = str(args.uds)
    else:
        options |= {"host": args.host, "port": args.port}
        print(f"API docs: http://{args.host}:{args.port}/docs", flush=True)

    parent = os.environ.get(MULTIPROC_ENV)
    if args.workers == 1 and parent is None:
        raise SystemExit(run(APP, settings=settings, **options))
    base = Path(parent or tempfile.gettempdir())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        p.error(f"{MULTIPROC_ENV}={base}: not a writable directory")
    with metrics_dir(base) as directory:
        os.environ[MULTIPROC_ENV] = str(directory)  # read by each worker as it starts
        try:
            if args.workers == 1:
                status = run(APP, settings=settings, **options)
            else:
                status = _supervised(args, settings, options, directory)
        finally:
            if parent is None:
                del os.environ[MULTIPROC_ENV]
            else:
                os.environ[MULTIPROC_ENV] = parent
    raise SystemExit(status)


def _supervised(args: argparse.Namespace, settings: Settings, options: dict[str, Any],
                directory: Path) -> int:
    """``--workers N`` (N > 1): the gateway's supervisor (``gateway.supervisor``) and its exit
    status, metrics in ``directory``."""
    config = gateway_config(settings, APP, workers=args.workers,
                            timeout_worker_healthcheck=args.timeout_worker_healthcheck,
                            **options)
    logs.configure(settings.log_format, args.log_level)  # the supervisor's lines too
    return serve_workers(config, directory)


if __name__ == "__main__":
    main()
