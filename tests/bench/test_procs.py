"""``bench.procs.free_port``: the kernel's pick, or a port of ``$BENCH_PORTS``; a gateway started
again when its port was taken."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench.procs import PORTS_ENV, free_port


def _two_adjacent() -> tuple[socket.socket, int]:
    """A bound socket on port p, with p + 1 free now."""
    for _ in range(100):
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                held.close()
                continue
        return held, port
    raise AssertionError("no two adjacent free ports")


def test_a_port_from_the_range_given(monkeypatch: pytest.MonkeyPatch) -> None:
    held, taken = _two_adjacent()
    with held:
        monkeypatch.setenv(PORTS_ENV, f"{taken}-{taken + 1}")
        assert {free_port() for _ in range(20)} == {taken + 1}  # never the taken one
        monkeypatch.setenv(PORTS_ENV, f"{taken}-{taken}")
        with pytest.raises(OSError, match="no free port"):
            free_port()


@pytest.mark.parametrize("span", ["20000", "9-x", "30000-20000", "0-10", "1-70000"])
def test_a_malformed_range_is_refused(monkeypatch: pytest.MonkeyPatch, span: str) -> None:
    monkeypatch.setenv(PORTS_ENV, span)
    with pytest.raises(ValueError, match="expected LOW-HIGH"):
        free_port()


def test_without_a_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORTS_ENV, raising=False)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it was free


@pytest.mark.e2e
def test_a_gateway_whose_port_was_taken_starts_on_another(
        session_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port picked for a gateway is taken before it binds: it is started again on a new
    pick, and serves."""
    from bench import procs

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])
        monkeypatch.setattr(procs, "free_port", lambda: next(picks, None) or free_port())
        with procs.gateways(1, {"GATEWAY_MODEL_ROOT": str(session_store)}) as (gw,):
            assert gw.port != taken.getsockname()[1]
            with gw.client() as client:
                assert client.get("/readyz").status_code == 200
