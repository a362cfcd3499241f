"""What travels in the actor's mailbox: envelopes around the requests of one vocabulary.

The requests themselves are those of :mod:`campaignstats.requests`, the same objects the wire
codec decodes and the embedding API builds (docs/design.md, "The house"). Here they only get an
envelope, in the manner of pykka: a cast (:class:`~campaignstats.requests.Increments` or
:class:`~campaignstats.requests.Decrements`) travels in a :class:`Tell`, which has no reply but
may name who hears of rejected items; a call travels in an :class:`Ask`, which carries the reply
future that the actor resolves with the result or with the error raised while answering (and keeps
running). Internal messages (:class:`CalculationDone`, :class:`CalculationFailed`) come back from
the calculation task the same way as any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from campaignstats.model import CalculationResult
from campaignstats.requests import Cast, Request

#: called by the actor with the (index, reason) of each item the state rejected
RejectedCallback = Callable[[list[tuple[int, str]]], None]


@dataclass(slots=True)
class Tell:
    """A cast in its envelope: one batch (one mailbox message per socket read, not per item)."""

    cast: Cast
    on_rejected: RejectedCallback | None = None
    #: call ``on_rejected`` even when nothing is rejected (its sender holds errors until then)
    report_empty: bool = False
    #: the producer that sent it (a socket connection's number), or None
    origin: int | None = None


@dataclass(slots=True)
class Ask:
    """A call in its envelope: the request and the future its answer goes to.

    A caller that gives up cancels the future; the actor then skips the request, so that a
    ``sub`` from a connection that has closed registers nothing.
    """

    request: Request
    reply: asyncio.Future[Any]
    #: the producer that sent it (a socket connection's number), or None
    origin: int | None = None
    #: called by the actor with ``reply`` as soon as it has set it, in its own turn of the event
    #: loop (the socket server writes the answer then: one turn sooner than a done callback,
    #: which it keeps for the answers that do not come from the actor)
    then: Callable[[asyncio.Future[Any]], None] | None = None


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


Message = Tell | Ask | CalculationDone | CalculationFailed | Stop
