"""The actor's bounded mailbox. It belongs to the supervisor, so it survives actor restarts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from campaignstats.errors import ActorStopped, Overloaded

from .messages import Message

DEFAULT_MAILBOX_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class MailboxStatistics:
    depth: int
    capacity: int
    blocked_producers: int  # producers waiting for room: backpressure in action


class Mailbox:
    """A FIFO of at most ``capacity`` messages.

    :meth:`put` waits while the mailbox is full (the socket server then stops reading its
    sockets, so memory stays flat); :meth:`put_nowait` raises :class:`Overloaded` instead.
    """

    def __init__(self, capacity: int = DEFAULT_MAILBOX_SIZE) -> None:
        if capacity < 1:
            raise ValueError("the mailbox needs room for at least one message")
        self.capacity = capacity
        self._queue: asyncio.Queue[Message] = asyncio.Queue(capacity)
        self._waiting = 0
        self.closed = False

    def close(self) -> None:
        """No more messages: every later put raises :class:`ActorStopped`."""
        self.closed = True

    async def put(self, message: Message) -> None:
        if self.closed:
            raise ActorStopped("the stats actor has stopped")
        if not self._queue.full():
            self._queue.put_nowait(message)
            return
        self._waiting += 1
        try:
            await self._queue.put(message)
        finally:
            self._waiting -= 1

    def put_nowait(self, message: Message) -> None:
        if self.closed:
            raise ActorStopped("the stats actor has stopped")
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            raise Overloaded(f"the stats mailbox is full ({self.capacity} messages)") from None

    async def get(self) -> Message:
        # asyncio.Queue.get is cancel-safe: a cancelled get never loses a message.
        return await self._queue.get()

    def get_nowait(self) -> Message | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def depth(self) -> int:
        return self._queue.qsize()

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(self._queue.qsize(), self.capacity, self._waiting)
