"""What the hardening tests add to ``bench.procs`` (gateways, redis-server): sums of samples
from ``/metrics`` text, and a TCP proxy that adds one-way latency."""

from __future__ import annotations

import asyncio
import re
import threading
from contextlib import suppress
from typing import Any

from bench.procs import GatewayProcess, free_port

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        have = dict(_LABEL.findall(m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m["value"])
    return total


def metric_total(gateways: list[GatewayProcess], name: str, **labels: str) -> float:
    """``metric`` summed over the ``/metrics`` of every gateway."""
    return sum(metric(gw.metrics(), name, **labels) for gw in gateways)


class DelayProxy:
    """A TCP proxy on a free loopback port that delivers every chunk ``delay_s`` after it was
    read, in each direction (so a round trip costs ``2 * delay_s`` more), in order. Runs its
    own event loop in a thread; ``delay_s`` may be changed while it runs."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Event | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted so far

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        assert self._server is not None, "proxy did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with self._server:
            await self._stop.wait()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.accepted += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                                 return_exceptions=True)
        finally:
            self._conns.discard(task)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            try:
                while True:
                    due, data = await chunks.get()
                    late = due - loop.time()
                    if late > 0:
                        await asyncio.sleep(late)  # the latency being simulated
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        delivery = loop.create_task(deliver())
        try:
            while data := await reader.read(65536):
                chunks.put_nowait((loop.time() + self.delay_s, data))
        except OSError:
            pass
        finally:
            chunks.put_nowait((loop.time() + self.delay_s, b""))
            with suppress(OSError):
                await delivery
