"""``python -m gateway``: serve with uvicorn (uvloop, httptools); settings from ``GATEWAY_*``."""

from __future__ import annotations

import argparse

from gateway.server import run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    print(f"API docs: http://{args.host}:{args.port}/docs", flush=True)
    raise SystemExit(run(
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    ))


if __name__ == "__main__":
    main()
