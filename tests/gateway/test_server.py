"""The server's configuration from settings (its behaviour is tested against real processes
in tests/hardening)."""

from __future__ import annotations

import resource

import pytest

from gateway import Settings
from gateway.server import (
    GatewayConfig,
    GatewayHttpProtocol,
    default_connection_limit,
    gateway_config,
)


@pytest.mark.parametrize(("soft", "limit"), [
    (1024, 896), (20_000, 17_500), (256, 128), (100, 1), (resource.RLIM_INFINITY, 65_536),
])
def test_connection_limit_leaves_a_reserve_of_open_files(
    monkeypatch: pytest.MonkeyPatch, soft: int, limit: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, resource.RLIM_INFINITY))
    assert default_connection_limit() == limit


def test_config_takes_bounds_from_settings_and_overrides_from_the_caller() -> None:
    settings = Settings(header_timeout_s=2, body_timeout_s=3, shutdown_grace_s=4,
                        limit_concurrency=50)
    quiet = {"log_config": None}  # uvicorn.Config would otherwise configure logging globally
    cfg = gateway_config(settings, host="127.0.0.1", port=9, workers=2, **quiet)
    assert isinstance(cfg, GatewayConfig)
    assert (cfg.header_timeout_s, cfg.body_timeout_s, cfg.shutdown_grace_s) == (2, 3, 4)
    assert cfg.limit_concurrency == 50 and cfg.workers == 2 and cfg.port == 9
    assert cfg.http is GatewayHttpProtocol and cfg.loop == "uvloop" and not cfg.access_log
    assert gateway_config(Settings(), **quiet).limit_concurrency == default_connection_limit()
    assert gateway_config(Settings(), limit_concurrency=7, **quiet).limit_concurrency == 7


def test_a_response_leaves_in_one_write() -> None:
    """Head and body of a response are joined into one write of the real transport."""
    import asyncio

    from gateway.server import _OneWrite

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str, default: object = None) -> str:
            return name

    loop = asyncio.new_event_loop()
    try:
        real = Recorder()
        out = _OneWrite(real, loop)  # type: ignore[arg-type]
        out.write(b"HTTP/1.1 200 OK\r\n\r\n")
        out.write(b"body")
        assert real.writes == []
        out.flush()  # the response is complete
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        out.write(b"late")
        loop.call_soon(loop.stop)
        loop.run_forever()  # a write not followed by a flush still leaves on the next step
        assert real.writes[-1] == b"late"
        out.write(b"last")
        out.close()  # closing sends what is pending first
        assert real.writes[-1] == b"last" and real.closed
        assert out.get_extra_info("peername") == "peername"
    finally:
        loop.close()
