"""One request vocabulary: the typed requests that the wire, the service and the actor all speak.

A request has one name from end to end. The server session decodes ``["stats", 7, 42]`` into
``Stats(42)`` (the ``req_id`` stays with the session, which owns reply order), the service puts
that same object in the actor's mailbox, and the actor finds its handler in a table keyed by the
type. A client session encodes the same object back into the wire form with :meth:`wire_args`.
Nothing here does I/O; nothing here knows about asyncio or sockets (docs/design.md, "The house").

Casts (no reply) are :class:`Increments`, :class:`Decrements` and :class:`MetricUpdates`;
everything else is a call.
``READS`` lists the calls that only read: they may be served ahead of queued increments, but
never ahead of the same producer's own earlier writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from campaignstats.metrics.update import MetricUpdate
from campaignstats.model import IncrementLike, Scope


@dataclass(frozen=True, slots=True)
class Increments:
    """A cast: a batch of increments (one mailbox message per socket read, not per item)."""

    items: Sequence[IncrementLike]

    op: ClassVar[str] = "incs"


@dataclass(frozen=True, slots=True)
class Decrements:
    """A cast: a batch of decrements, each the exact inverse of the same increment."""

    items: Sequence[IncrementLike]

    op: ClassVar[str] = "decs"


@dataclass(frozen=True, slots=True)
class MetricUpdates:
    """A cast: custom metrics updates (docs/metrics.md), each checked by the one validator
    (:func:`campaignstats.metrics.update.update_from_map`). On the wire each is one
    ``["metric", UPDATE]``; the consecutive ones of a socket read travel as one batch."""

    items: Sequence[MetricUpdate]

    op: ClassVar[str] = "metric"


Cast = Increments | Decrements | MetricUpdates


@dataclass(frozen=True, slots=True)
class Stats:
    campaign_id: int

    op: ClassVar[str] = "stats"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class StatsMany:
    campaign_ids: Sequence[int]

    op: ClassVar[str] = "stats_many"

    def wire_args(self) -> tuple[Any, ...]:
        return (list(self.campaign_ids),)


@dataclass(frozen=True, slots=True)
class Flush:
    """Answered once every message before it, from the same producer, has been applied."""

    #: when the metrics log cannot be written: keep the changes not written (buffered, the
    #: next commit retries) and raise ``MetricsPending`` (HTTP answers 202 ``pending``), rather
    #: than drop them (the socket's ``flush``: not acknowledged, not kept; docs/metrics.md)
    keep_metrics: bool = False

    op: ClassVar[str] = "flush"

    def wire_args(self) -> tuple[Any, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class Info:
    op: ClassVar[str] = "info"

    def wire_args(self) -> tuple[Any, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class Resync:
    scope: Scope

    op: ClassVar[str] = "resync"

    def wire_args(self) -> tuple[Any, ...]:
        scope = self.scope
        return (scope if isinstance(scope, str) else list(scope),)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscriber`` is filled in by whoever delivers the updates (the server's connection, an
    embedding application's :class:`~campaignstats.actor.subscriptions.Subscription`); the wire
    form carries only the campaign."""

    campaign_id: int
    subscriber: Any = None

    op: ClassVar[str] = "sub"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    campaign_id: int | None  # None: every campaign of this subscriber (never on the wire)
    subscriber: Any = None

    op: ClassVar[str] = "unsub"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class GetMetrics:
    """A campaign's custom metrics: ``{"total": VALUES, "dims": {...}}`` (docs/metrics.md)."""

    campaign_id: int

    op: ClassVar[str] = "metrics"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class ResetMetrics:
    """Drop one metric name's values (``name``), or all of a campaign's (None); guards stay.
    Answered ``{"found": bool}``: whether there was something to drop."""

    campaign_id: int
    name: str | None = None

    op: ClassVar[str] = "reset_metrics"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id, self.name)


Request = (
    Stats | StatsMany | Flush | Info | Resync | Subscribe | Unsubscribe | GetMetrics | ResetMetrics
)

#: read-only requests: they may take the mailbox's read lane
READS: tuple[type, ...] = (Stats, StatsMany, Info, GetMetrics)

__all__ = [
    "READS",
    "Cast",
    "Decrements",
    "Flush",
    "GetMetrics",
    "Increments",
    "Info",
    "MetricUpdates",
    "Request",
    "ResetMetrics",
    "Resync",
    "Stats",
    "StatsMany",
    "Subscribe",
    "Unsubscribe",
]
