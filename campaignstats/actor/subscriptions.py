"""Change notifications: a campaign's new stats, at most once per second while it changes.

A :class:`Subscriber` is anything with a non-blocking ``push(campaign_id, stats)``; the socket
server's connections are subscribers, and so is :class:`Subscription`, the async iterator an
embedding application gets. The registry lives with the supervisor, so subscriptions survive an
actor restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from campaignstats.model import WireStats

DEFAULT_PUBLISH_INTERVAL = 1.0  # seconds


@runtime_checkable
class Subscriber(Protocol):
    def push(self, campaign_id: int, stats: WireStats) -> None:
        """Take an update without blocking (drop or coalesce if the consumer is slow)."""


class Subscription:
    """An async iterator of ``(campaign_id, stats)`` updates.

    It keeps only the newest stats per campaign: a slow consumer skips intermediate values
    instead of making memory grow.
    """

    def __init__(self, on_close: Callable[[Subscription], None] | None = None) -> None:
        self._pending: dict[int, WireStats] = {}
        self._event = asyncio.Event()
        self._on_close = on_close
        self._closed = False

    def push(self, campaign_id: int, stats: WireStats) -> None:
        self._pending.pop(campaign_id, None)  # re-insert: keeps the order of the latest changes
        self._pending[campaign_id] = stats
        self._event.set()

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._event.set()
            if self._on_close is not None:
                self._on_close(self)

    def __aiter__(self) -> AsyncIterator[tuple[int, WireStats]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, WireStats]]:
        while not self._closed:
            if not self._pending:
                self._event.clear()
                await self._event.wait()
                continue
            campaign_id = next(iter(self._pending))
            yield campaign_id, self._pending.pop(campaign_id)


class Registry:
    """Who watches which campaign, and which watched campaigns changed since the last publish."""

    def __init__(self) -> None:
        self.watchers: dict[int, set[Subscriber]] = {}
        self.dirty: set[int] = set()
        self._by_subscriber: dict[Subscriber, set[int]] = {}

    def add(self, campaign_id: int, subscriber: Subscriber) -> None:
        self.watchers.setdefault(campaign_id, set()).add(subscriber)
        self._by_subscriber.setdefault(subscriber, set()).add(campaign_id)

    def remove(self, campaign_id: int | None, subscriber: Subscriber) -> None:
        """Forget one subscription, or (``None``) all of a subscriber's.

        Called by the actor for ``unsub``, and directly (same event loop, never blocked by a
        full mailbox) when a connection or subscription closes.
        """
        mine = self._by_subscriber.get(subscriber, set())
        ids = list(mine) if campaign_id is None else [campaign_id]
        for cid in ids:
            mine.discard(cid)
            subs = self.watchers.get(cid)
            if subs is not None:
                subs.discard(subscriber)
                if not subs:
                    del self.watchers[cid]
                    self.dirty.discard(cid)
        if not mine:
            self._by_subscriber.pop(subscriber, None)

    def count(self) -> int:
        return sum(len(s) for s in self.watchers.values())
