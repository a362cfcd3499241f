"""The actor's bounded mailbox. It belongs to the supervisor, so it survives actor restarts.

Two lanes, each bounded. The normal lane keeps everything in order: increments, and every call
whose answer depends on what came before it (``flush``, ``resync``, subscriptions...). The read
lane takes queries that only read (``stats``, ``stats_many``, ``info``) and is served first, so
that a query waits for at most the message the actor is busy with, not for thousands of queued
increment batches. A producer keeps its reads after its own writes: every message of the normal
lane gets a sequence number, and a producer uses the read lane only once the actor has taken the
last message it put in the normal lane (:meth:`taken_up_to`). A message the actor handles in
slices (a large batch of increments, queries served between its slices) counts as taken only
once its last slice is applied (:meth:`begin_partial`, :meth:`end_partial`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from campaignstats.errors import ActorStopped, Overloaded

from .messages import Message, Tell

DEFAULT_MAILBOX_SIZE = 10_000
#: increments (and decrements) waiting in the normal lane, whatever the messages carrying them:
#: a socket read of single ``inc`` frames is one message of up to several thousand items, and
#: the actor applies large ones in slices while connections keep reading
DEFAULT_MAILBOX_ITEMS = 100_000


@dataclass(frozen=True, slots=True)
class MailboxStatistics:
    depth: int
    capacity: int
    blocked_producers: int  # producers waiting for room: backpressure in action
    reads: int = 0  # queries waiting in the read lane
    items: int = 0  # increments (and decrements) waiting in the normal lane


class Mailbox:
    """At most ``capacity`` messages in each lane, and about ``items`` increments in the normal
    lane (a message is refused once they are reached, so one large message still gets in).

    :meth:`put` waits while the normal lane is full (the socket server then stops reading its
    sockets, so memory stays flat); :meth:`put_nowait` raises :class:`Overloaded` instead.
    """

    def __init__(self, capacity: int = DEFAULT_MAILBOX_SIZE, items: int = DEFAULT_MAILBOX_ITEMS):
        if capacity < 1 or items < 1:
            raise ValueError("the mailbox needs room for at least one message")
        self.capacity = capacity
        self.item_capacity = items
        self._items = 0  # increments in the normal lane's messages
        self._normal: deque[Message] = deque()
        self._reads: deque[Message] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self.closed = False
        self._submitted = 0  # sequence number of the last message put in the normal lane
        self._taken = 0  # sequence number of the last one taken out
        self._partial = 0  # 1 while the last one taken out is still being handled in slices

    def close(self) -> None:
        """No more messages: every later put raises :class:`ActorStopped`."""
        self.closed = True
        for putter in self._putters:
            if not putter.done():
                putter.set_result(None)  # they wake up, see closed, and raise

    async def put(self, message: Message) -> int:
        """Queue ``message``, waiting for room; returns its sequence number."""
        while self._full():
            if self.closed:
                raise ActorStopped("the stats actor has stopped")
            putter = asyncio.get_running_loop().create_future()
            self._putters.append(putter)
            try:
                await putter
            except BaseException:
                if putter in self._putters:
                    self._putters.remove(putter)
                elif putter.done() and not putter.cancelled():
                    # Woken for a free place, then cancelled before taking it: the place must
                    # not be lost, so the next waiting producer gets the wake-up (as
                    # asyncio.Queue does).
                    self._wake_putter()
                raise
        return self.put_nowait(message)

    def put_nowait(self, message: Message) -> int:
        """Queue ``message`` or raise Overloaded; returns its sequence number."""
        if self.closed:
            raise ActorStopped("the stats actor has stopped")
        if self._full():
            raise Overloaded(
                f"the stats mailbox is full ({len(self._normal)} messages, {self._items} items)"
            )
        self._normal.append(message)
        self._items += _size(message)
        self._submitted += 1
        self._wake_getter()
        return self._submitted

    def taken_up_to(self, sequence: int) -> bool:
        """True once the actor has taken (and so handled) the message numbered ``sequence``."""
        return self._taken - self._partial >= sequence

    def begin_partial(self) -> None:
        """The actor handles the message it last took in slices, serving the read lane between
        them: until :meth:`end_partial`, it does not count as taken (its producer's queries
        wait in the normal lane, behind the rest of it)."""
        self._partial = 1

    def end_partial(self) -> None:
        """The message taken last is fully handled (also what a new actor says at its start)."""
        self._partial = 0

    @property
    def partial(self) -> bool:
        """A message is being handled in slices."""
        return bool(self._partial)

    def put_read_nowait(self, message: Message) -> None:
        """A read-only query, served ahead of the normal lane. Raises Overloaded when full."""
        if self.closed:
            raise ActorStopped("the stats actor has stopped")
        if len(self._reads) >= self.capacity:
            raise Overloaded(f"the stats mailbox is full ({self.capacity} queries)")
        self._reads.append(message)
        self._wake_getter()

    def _wake_getter(self) -> None:
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def get(self) -> Message:
        # Cancel-safe: a message stays in its lane until get_nowait takes it.
        while (message := self.get_nowait()) is None:
            getter = self._getter = asyncio.get_running_loop().create_future()
            try:
                await getter
            finally:
                self._getter = None
        return message

    def get_read_nowait(self) -> Message | None:
        """The next query of the read lane, or None (what the actor serves between slices)."""
        return self._reads.popleft() if self._reads else None

    def get_nowait(self) -> Message | None:
        if self._reads:
            return self._reads.popleft()
        if not self._normal:
            return None
        message = self._normal.popleft()
        self._items -= _size(message)
        self._taken += 1
        self._wake_putter()
        return message

    def _wake_putter(self) -> None:
        """Room for one more: wake the first producer still waiting."""
        while self._putters:
            putter = self._putters.popleft()
            if not putter.done():
                putter.set_result(None)
                break

    def _full(self) -> bool:
        return len(self._normal) >= self.capacity or self._items >= self.item_capacity

    def depth(self) -> int:
        return len(self._normal) + len(self._reads)

    def statistics(self) -> MailboxStatistics:
        waiting = sum(1 for p in self._putters if not p.done())
        return MailboxStatistics(
            len(self._normal), self.capacity, waiting, len(self._reads), self._items
        )


def _size(message: Message) -> int:
    """The increments a message carries (0 for anything but a batch)."""
    return len(message.cast.items) if type(message) is Tell else 0
