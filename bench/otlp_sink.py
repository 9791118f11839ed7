"""``python -m bench.otlp_sink --port N``: an OTLP/HTTP endpoint that accepts every export
(``POST /v1/traces``) and discards it, for measuring what tracing costs the gateway without a
collector's own work in the measurement. Counts exports and bytes; prints them on SIGTERM or
SIGINT and exits."""

from __future__ import annotations

import argparse
import asyncio
import signal

__all__ = ["main"]

_REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n"
          b"content-length: 0\r\n\r\n")
_MAX_HEAD = 65_536


async def _serve(port: int) -> tuple[int, int]:
    exports = size = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal exports, size
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > _MAX_HEAD:
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                exports += 1
                size += length
                writer.write(_REPLY)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            writer.close()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        print(f"OTLP sink on http://127.0.0.1:{port}/v1/traces", flush=True)
        await stop.wait()
    return exports, size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.otlp_sink",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    exports, size = asyncio.run(_serve(args.port))
    print(f"{exports} exports, {size} bytes")


if __name__ == "__main__":
    main()
