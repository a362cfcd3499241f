"""What travels in the actor's mailbox: small public types, casts apart from calls.

A cast (:class:`Increments`) has no reply. A call is wrapped in an :class:`Ask` envelope that
carries the reply future; the actor resolves it with the result or with the error raised while
answering (and keeps running). Internal messages (:class:`CalculationDone`,
:class:`CalculationFailed`) come back from the calculation task the same way as any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from campaignstats.model import CalculationResult, IncrementLike

if TYPE_CHECKING:
    from campaignstats.model import Scope

    from .subscriptions import Subscriber

#: called by the actor with the (index, reason) of each increment the state rejected
RejectedCallback = Callable[[list[tuple[int, str]]], None]


class Increments(NamedTuple):
    """A cast: a batch of increments (one mailbox message per socket read, not per increment)."""

    items: Sequence[IncrementLike]
    on_rejected: RejectedCallback | None = None


# -- calls ----------------------------------------------------------------------------------------


class GetStats(NamedTuple):
    campaign_id: int


class GetStatsMany(NamedTuple):
    campaign_ids: Sequence[int]


class Flush(NamedTuple):
    """Answered once every message before it in the mailbox has been applied."""


class GetInfo(NamedTuple):
    pass


class Resync(NamedTuple):
    scope: Scope


class Subscribe(NamedTuple):
    campaign_id: int
    subscriber: Subscriber


class Unsubscribe(NamedTuple):
    campaign_id: int | None  # None: every campaign of this subscriber
    subscriber: Subscriber


Request = GetStats | GetStatsMany | Flush | GetInfo | Resync | Subscribe | Unsubscribe

#: read-only requests: they may take the mailbox's read lane, ahead of queued increments
READS = (GetStats, GetStatsMany, GetInfo)


@dataclass(slots=True)
class Ask:
    """A call in its envelope: the request and the future its answer goes to."""

    request: Request
    reply: asyncio.Future[Any]


# -- internal -------------------------------------------------------------------------------------


class CalculationDone(NamedTuple):
    generation: int
    result: CalculationResult


class CalculationFailed(NamedTuple):
    generation: int
    kind: str
    error: BaseException


class Stop(NamedTuple):
    """Drain what is in the mailbox, write the snapshot, stop."""


Message = Increments | Ask | CalculationDone | CalculationFailed | Stop
