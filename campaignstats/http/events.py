"""Server-sent events: one subscription per campaign, fanned out to every open stream.

However many browsers follow a campaign, the service sees one subscriber for it: the
:class:`EventHub` subscribes once per campaign (:meth:`StatsService.subscribe`), encodes each
change once, and offers the same bytes to every stream of that campaign. The actor publishes a
campaign at most once per publish interval (one second by default), so streams get changes at
that pace (docs/http.md, "Live").

Every stream has a bounded queue of encoded events. A stream whose reader does not keep up
(uvicorn stops handing it bytes once the socket and the transport buffer are full, so the writer
waits, and the queue fills) is dropped: its connection is closed, never buffered without bound.
A keep-alive comment every 15 s goes through the same queue, so a reader that has stopped
reading is found out even when the campaign is quiet.

Goal events (``milestone``, ``quorum``) are never what makes a reader slow: the actor may fire
dozens at once (a quorum in each of 27 member states crossed by one batch), and the pump offers
them all before the stream's writer runs. Each one offered is queued whatever the queue holds,
and raises the stream's limit by one until the writer has emptied the queue; they are few and
bounded by the goals (each threshold fires once, ever).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import structlog

from campaignstats.actor.subscriptions import Subscription
from campaignstats.errors import Overloaded
from campaignstats.model import WireStats
from campaignstats.service import StatsService, TaskHost

log = structlog.get_logger(__name__)

KEEPALIVE = b": keep-alive\n\n"
#: what a browser waits before it reconnects a lost stream, in milliseconds
RETRY_MS = 3000

_encode = msgspec.json.Encoder().encode


def stats_body(campaign_id: int, stats: WireStats) -> dict[str, object]:
    """STATS plus ``campaign_id`` (first), as the JSON reads and the events carry it."""
    body: dict[str, object] = {"campaign_id": campaign_id}
    body.update(stats)
    return body


def encode_event(event: str, data: object) -> bytes:
    """One event of the stream: JSON has no raw newline, so ``data`` fits on one line."""
    return b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


class Stream:
    """One open event stream: a bounded queue of encoded events and the writer's wake-up."""

    __slots__ = (
        "allowance",
        "campaign_id",
        "closed",
        "dropped",
        "limit",
        "on_drop",
        "pending",
        "released",
        "wake",
    )

    def __init__(self, campaign_id: int, limit: int, on_drop: Callable[[Stream], None]) -> None:
        self.campaign_id = campaign_id
        self.limit = limit
        self.on_drop = on_drop
        self.pending: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.closed = False  # the reader went away, or the hub is closing
        self.dropped = False  # too slow: the writer is stopped and the connection closed
        self.released = False  # no longer counted by the hub
        #: goal events offered since the queue was last empty: not counted toward the limit
        self.allowance = 0

    def offer(self, chunk: bytes, *, goal: bool = False) -> None:
        """Queue a chunk; past the limit the stream is dropped, except for a goal event (see the
        module doc)."""
        if self.closed:
            return
        if not self.pending:
            self.allowance = 0  # the writer has caught up
        if goal:
            self.allowance += 1
        elif len(self.pending) >= self.limit + self.allowance:
            self.dropped = True
            self.close()
            self.on_drop(self)
            return
        self.pending.append(chunk)
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


@dataclass(eq=False)
class _Channel:
    """The streams of one campaign and the one subscription that feeds them."""

    campaign_id: int
    ready: asyncio.Future[None]
    streams: set[Stream] = field(default_factory=set)
    subscription: Subscription | None = None
    pump: asyncio.Task[None] | None = None


@dataclass
class HubCounters:
    opened: int = 0
    dropped_slow: int = 0
    refused: int = 0
    events: int = 0  # encoded once per campaign change, whatever the number of streams


class EventHub:
    """Fans each campaign's changes out to its open streams; owns its tasks (one pump per
    followed campaign, one keep-alive ticker) and cancels them in :meth:`close`."""

    def __init__(
        self,
        service: StatsService,
        *,
        max_pending: int = 16,
        keepalive: float = 15.0,
        max_streams: int = 10_000,
    ) -> None:
        self.service = service
        self.max_pending = max_pending
        self.keepalive = keepalive
        self.max_streams = max_streams
        self.counters = HubCounters()
        self._channels: dict[int, _Channel] = {}
        self._streams = 0
        self._ticker: asyncio.Task[None] | None = None
        #: the keep-alive ticker and one pump per followed campaign live in this task group
        self._tasks = TaskHost("http-event-streams")
        self._starting = asyncio.Lock()
        self._closed = False
        #: called with the stream that was dropped, so the endpoint can stop its writer
        self.on_drop: Callable[[Stream], None] = lambda stream: None

    @property
    def streams(self) -> int:
        return self._streams

    @property
    def campaigns(self) -> int:
        return len(self._channels)

    async def open(self, campaign_id: int) -> Stream:
        """A new stream of this campaign, subscribed before it returns (so the caller may read
        the current stats and miss no change after it). Raises Overloaded past ``max_streams``."""
        if self._closed:
            raise Overloaded("the HTTP server is stopping")
        if not self._tasks.open:
            async with self._starting:  # many streams may open at once
                if not self._tasks.open:
                    await self._tasks.start()
        if self._streams >= self.max_streams:
            self.counters.refused += 1
            raise Overloaded(f"too many event streams (at most {self.max_streams})")
        self._streams += 1
        stream = Stream(campaign_id, self.max_pending, self._dropped)
        try:
            channel = self._channels.get(campaign_id)
            if channel is None:
                channel = _Channel(campaign_id, asyncio.get_running_loop().create_future())
                self._channels[campaign_id] = channel
                channel.streams.add(stream)
                await self._subscribe(channel)
            else:
                channel.streams.add(stream)
                await asyncio.shield(channel.ready)
        except BaseException:
            self.release(stream)
            raise
        self.counters.opened += 1
        if self._ticker is None:
            self._ticker = self._tasks.spawn(self._keep_alive(), name="http-sse-keepalive")
        return stream

    async def _subscribe(self, channel: _Channel) -> None:
        try:
            channel.subscription = await self.service.subscribe(channel.campaign_id)
        except BaseException as exc:
            # Everyone waiting on this channel fails with the same error; the next stream of the
            # campaign starts afresh.
            if self._channels.get(channel.campaign_id) is channel:
                del self._channels[channel.campaign_id]
            channel.ready.set_exception(exc if isinstance(exc, Exception) else Overloaded("gone"))
            channel.ready.exception()  # retrieved: each waiter re-raises through shield()
            raise
        channel.ready.set_result(None)
        channel.pump = self._tasks.spawn(
            self._pump(channel, channel.subscription), name=f"http-sse-{channel.campaign_id}"
        )

    async def _pump(self, channel: _Channel, subscription: Subscription) -> None:
        # An error is logged, not raised: in the task group it would end every other stream.
        try:
            async for kind, campaign_id, data in subscription.feed():
                goal = kind == "event"
                if goal:  # a milestone or a quorum: its EVENT map as it is
                    chunk = encode_event(str(data["type"]), data)
                else:
                    chunk = encode_event("stats", stats_body(campaign_id, data))
                self.counters.events += 1
                for stream in list(channel.streams):
                    stream.offer(chunk, goal=goal)
        except Exception:
            log.exception("http.event_pump_failed", campaign_id=channel.campaign_id)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive)
            for channel in list(self._channels.values()):
                for stream in list(channel.streams):
                    stream.offer(KEEPALIVE)

    def _dropped(self, stream: Stream) -> None:
        self.counters.dropped_slow += 1
        log.warning(
            "http.slow_reader_dropped", campaign_id=stream.campaign_id, pending=len(stream.pending)
        )
        stream.pending.clear()
        self.release(stream)
        self.on_drop(stream)

    def release(self, stream: Stream) -> None:
        """Forget a stream (its reader left, it was dropped, or it failed to open); idempotent.
        The campaign's subscription ends with its last stream."""
        if stream.released:
            return
        stream.released = True
        self._streams -= 1
        channel = self._channels.get(stream.campaign_id)
        if channel is None:
            return
        channel.streams.discard(stream)
        if not channel.streams and channel.ready.done():
            del self._channels[stream.campaign_id]
            self._end(channel)

    def _end(self, channel: _Channel) -> None:
        if channel.subscription is not None:
            channel.subscription.close()  # unsubscribes, and ends the pump's iteration
        if channel.pump is not None:
            channel.pump.cancel()

    async def close(self) -> None:
        """End every stream (their writers finish their responses) and every task."""
        self._closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        tasks: list[asyncio.Task[None]] = []
        for channel in channels:
            for stream in channel.streams:
                stream.close()
                stream.released = True
            self._streams -= len(channel.streams)
            channel.streams.clear()
            self._end(channel)
            if channel.pump is not None:
                tasks.append(channel.pump)
        if self._ticker is not None:
            self._ticker.cancel()
            tasks.append(self._ticker)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._tasks.close(1.0)
