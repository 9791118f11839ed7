"""Deployment test helpers: the nginx config grammar, the gRPC fronts rendered for a test, metric
totals, bounded HTTP load."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
NGINX_DIR = ROOT / "deploy" / "nginx"
KUBE_DIR = ROOT / "deploy" / "kubernetes"

_TOKEN = re.compile(r"""\s+|#[^\n]*|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[{};]|[^\s{};"'#]+""")


@dataclass
class Directive:
    """One nginx directive: its name, arguments (quotes removed) and block, if any."""

    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        (found,) = self.find(name)
        return found


@dataclass
class Conf:
    directives: list[Directive] = field(default_factory=list)

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.directives if d.name == name]


def parse_nginx(text: str) -> Conf:
    """nginx's config grammar, enough for the shipped files: directives, blocks, quotes."""
    tokens = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    pos = 0

    def block(until_brace: bool) -> list[Directive]:
        nonlocal pos
        out: list[Directive] = []
        words: list[str] = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == ";":
                out.append(Directive(words[0], words[1:]))
                words = []
            elif tok == "{":
                out.append(Directive(words[0], words[1:], block(True)))
                words = []
            elif tok == "}":
                assert until_brace and not words, "unbalanced '}'"
                return out
            else:
                words.append(tok[1:-1] if tok[0] in "\"'" else tok)
        assert not until_brace and not words, "unterminated block or directive"
        return out

    return Conf(block(False))


def free_ports(count: int) -> list[int]:
    """``count`` different loopback ports nothing listens on now (``free_port`` twice may
    return one port twice: each socket is closed before the next bind)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


GRPC_LISTEN = "    listen 8081 http2;"


def render_grpc(conf: Path, *, listen: str, upstreams: Sequence[str]) -> str:
    """A shipped gRPC front (``deploy/nginx/*-grpc.conf``) with its listen address and the
    ``server`` lines of ``upstream gateway_grpc`` replaced (each with the first one's
    parameters); every other line as shipped. It goes in the same http context as the REST
    front rendered by ``bench.replicas.render_site``, whose map and log format it uses."""
    text = conf.read_text()
    assert text.count(GRPC_LISTEN) == 1, f"{conf}: expected {GRPC_LISTEN!r} once"
    text = text.replace(GRPC_LISTEN, f"    listen {listen} http2;")
    block = re.search(r"upstream gateway_grpc \{\n(.*?)\n\}", text, re.S)
    assert block, f"{conf}: no 'upstream gateway_grpc' block"
    lines = block.group(1).splitlines()
    servers = [m for line in lines if (m := re.match(r"\s*server\s+\S+(.*);$", line))]
    assert servers, f"{conf}: no server line in 'upstream gateway_grpc'"
    body = [f"    server {u}{servers[0].group(1)};" for u in upstreams]
    body += [line for line in lines if not re.match(r"\s*server\s", line)]
    return text[:block.start(1)] + "\n".join(body) + text[block.end(1):]


def nginx_size(value: str) -> int:
    """An nginx size (``1m``, ``16k``, ``512``) in bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, value
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def nginx_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[m.group(2)]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (``name`` as exposed, e.g. ``gateway_requests_total``)
    whose labels include ``labels``."""
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def redis_url(proc: Any) -> str:
    """The URL of a redis-server of the tests' own."""
    return f"redis://{proc.host}:{proc.port}/0"


@dataclass
class LoadResult:
    completed: int = 0
    problems: list[str] = field(default_factory=list)  # failed requests and wrong answers


async def bounded_load(
    client: httpx.AsyncClient,
    requests: list[Callable[[httpx.AsyncClient], Awaitable[tuple[int, Any, Any]]]],
    *, concurrency: int, on_done: Callable[[int], None] = lambda _n: None,
) -> LoadResult:
    """Run ``requests`` (each returns status, answer, expected answer) with ``concurrency`` at
    once. A transport error, a status other than 200 or an answer other than the expected one
    is a problem. ``on_done(n)`` runs after the n-th completion (to inject faults mid-load)."""
    result = LoadResult()
    queue = iter(enumerate(requests))

    async def worker() -> None:
        for i, request in queue:
            try:
                status, got, expected = await request(client)
            except httpx.HTTPError as exc:
                result.problems.append(f"request {i}: {exc!r}")
            else:
                if status != 200:
                    result.problems.append(f"request {i}: status {status}: {got!r}")
                elif got != expected:
                    result.problems.append(f"request {i}: {got!r} != {expected!r}")
            result.completed += 1
            on_done(result.completed)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result
