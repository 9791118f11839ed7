"""Repository changes announced to every gateway process sharing the Redis.

A model loaded or unloaded through the repository API (``POST /v2/repository/models/{name}/
load|unload``) changes what one process serves; behind nginx or with ``--workers N`` the next
request may reach another. So the process that took the call applies it, then publishes it on
the channel ``<prefix>:repository``, to which every process with the same Redis and cache
prefix subscribes (one connection each) and applies what it hears, except its own. ``PUBLISH``
answers how many other processes heard it: the API's answer says so.

Only the change travels, not a state: a process that was not subscribed at that moment (Redis
unreachable, starting) does not hear it; without Redis a change reaches the process that took
the call alone. The answer says which.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.cache import RedisCache
from gateway.errors import GatewayError
from gateway.redis_client import REDIS_FAILURES, listen

__all__ = ["Announcer"]

log = logging.getLogger("gateway.announce")

Apply = Callable[[str, str], Awaitable[None]]
"""``apply(op, model)`` with ``op`` ``load`` or ``unload``: the change made here too."""

_OPS = frozenset({"load", "unload"})


class Announcer:
    """See the module docstring. ``subscriber()`` makes a client for one subscription; start
    with ``start(apply)``, end with ``aclose()``."""

    def __init__(self, cache: RedisCache, subscriber: Callable[[], Any], *, prefix: str) -> None:
        self._cache = cache
        self._subscriber = subscriber
        self.channel = f"{prefix}:repository"
        self._me = secrets.token_hex(8)
        self._apply: Apply | None = None
        self._listener: asyncio.Task[None] | None = None
        self._applying: set[asyncio.Task[None]] = set()
        self.subscribed = asyncio.Event()

    def start(self, apply: Apply) -> None:
        self._apply = apply
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def announce(self, op: str, model: str) -> int | None:
        """Publish ``op`` on ``model`` to the other processes: how many heard it (None: Redis
        did not answer within its timeout, or is skipped)."""
        if self._cache.blocked():
            return None
        message = orjson.dumps({"op": op, "model": model, "from": self._me})
        try:
            async with asyncio.timeout(self._cache.timeout_s):
                heard = int(await self._cache.client.publish(self.channel, message))
        except REDIS_FAILURES as exc:
            self._cache.failed(exc)
            return None
        self._cache.succeeded()
        return heard - 1 if self.subscribed.is_set() else heard  # it hears its own too

    def _heard(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            op, model, sender = message["op"], message["model"], message["from"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("repository channel: a message that is not a change, ignored")
            return
        if sender == self._me or op not in _OPS or type(model) is not str:
            return
        assert self._apply is not None
        task = asyncio.get_running_loop().create_task(self._applied(op, model))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _applied(self, op: str, model: str) -> None:
        assert self._apply is not None
        try:
            await self._apply(op, model)
        except GatewayError as exc:  # e.g. the model is not in this process's store
            log.warning("model %s: %s announced by another process failed here: %s",
                        model, op, exc)
        else:
            log.info("model %s: %s, as announced by another process", model, op)

    async def _listen(self) -> None:
        await listen(self._subscriber, self.channel, self._heard, self.subscribed)

    async def aclose(self) -> None:
        tasks = [t for t in (self._listener, *self._applying) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
