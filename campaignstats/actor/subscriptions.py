"""Change notifications: a campaign's new stats, at most once per second while it changes.

A :class:`Subscriber` is anything with a non-blocking ``push(campaign_id, stats)``; the socket
server's connections are subscribers, and so is :class:`Subscription`, the async iterator an
embedding application gets. The registry lives with the supervisor, so subscriptions survive an
actor restart.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from campaignstats.model import WireStats

DEFAULT_PUBLISH_INTERVAL = 1.0  # seconds


@runtime_checkable
class Subscriber(Protocol):
    """A subscriber may also have ``push_event(campaign_id, event)``: the actor then hands it
    the campaign's milestone and quorum events (docs/protocol.md, "Events")."""

    def push(self, campaign_id: int, stats: WireStats) -> None:
        """Take an update without blocking (drop or coalesce if the consumer is slow)."""


#: goal events a Subscription keeps unread before the oldest go
MAX_PENDING_EVENTS = 1_000


class Subscription:
    """An async iterator of ``(campaign_id, stats)`` updates.

    It keeps only the newest stats per campaign: a slow consumer skips intermediate values
    instead of making memory grow.
    """

    def __init__(self, on_close: Callable[[Subscription], None] | None = None) -> None:
        self._pending: dict[int, WireStats] = {}
        #: goal events, in order and never coalesced (bounded)
        self._events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=MAX_PENDING_EVENTS)
        self._event = asyncio.Event()
        self._on_close = on_close
        self._closed = False

    def push(self, campaign_id: int, stats: WireStats) -> None:
        self._pending.pop(campaign_id, None)  # re-insert: keeps the order of the latest changes
        self._pending[campaign_id] = stats
        self._event.set()

    def push_event(self, campaign_id: int, event: dict[str, Any]) -> None:
        self._events.append((campaign_id, event))
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

    async def feed(self) -> AsyncIterator[tuple[str, int, dict[str, Any]]]:
        """Updates and goal events together: ``("stats", campaign_id, STATS)`` and
        ``("event", campaign_id, EVENT)``, events first. (Iterating the subscription itself
        gives the stats only.)"""
        while not self._closed:
            if self._events:
                campaign_id, event = self._events.popleft()
                yield "event", campaign_id, event
                continue
            if not self._pending:
                self._event.clear()
                await self._event.wait()
                continue
            campaign_id = next(iter(self._pending))
            yield "stats", campaign_id, dict(self._pending.pop(campaign_id))

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
