"""The goals' durable log (the outbox) and the webhook deliveries (docs/design.md, "Webhooks").

:class:`Outbox` is an append-only file in the format of the metrics log
(:class:`campaignstats.metrics.log.MetricsLog`). It holds:

* ``e`` ``[id, campaign_id, EVENT, [url, ...]]``: an event fired, and the webhooks it is owed to.
  The actor appends it (and fsyncs) before the event counts as fired: before it is pushed to a
  subscriber and before the keeper's memory of it could be lost with the process;
* ``d`` ``[id, url]``: the event was delivered to that webhook. Written at once but not
  fsynced (the sender must not stall the event loop the actor shares): a power loss may forget
  a delivery, which is then made again, with the same id;
* ``g`` ``[campaign_id, supporters, area, reached, area_reached]``: goals set with ``set_goals``,
  with what they recorded as reached at once.

At start the records are replayed over the snapshot (the goals, what was reached) and the events
not delivered to every webhook are delivered again. A torn tail (``kill -9`` while writing) is cut
off with a warning, as the metrics log does. When the snapshot has been written (at stop) the log
is rewritten with only the events still owed (copied first, then the old records dropped: a crash
in between leaves both, which replay the same).

:class:`WebhookSender` runs in the service's task host: one worker per webhook URL, each posting
the events owed to it in order, retrying a failure with exponential backoff and jitter (bounded
by ``backoff_max``), never giving up on an event: it stays in the outbox until delivered. The
actor never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from campaignstats._version import __version__
from campaignstats.goals import Event, GoalKeeper, GoalsSpec, check_goals, event_id
from campaignstats.metrics.log import MetricsLog, Record

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Campaignstats-Signature"
EVENT_ID_HEADER = "X-Campaignstats-Event-Id"
EVENT_TYPE_HEADER = "X-Campaignstats-Event"
SECRET_ENV = "CAMPAIGNSTATS_WEBHOOK_SECRET"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """``campaignstats serve --webhook URL --webhook-secret S`` (docs/design.md, "Webhooks")."""

    urls: tuple[str, ...] = ()
    secret: bytes | None = None
    timeout: float = 10.0  # seconds per POST
    backoff_initial: float = 1.0
    backoff_max: float = 300.0

    def check(self) -> str | None:
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                return f"a webhook must be an http:// or https:// URL, not {url!r}"
        if len(set(self.urls)) != len(self.urls):
            return "the same webhook URL is given twice"
        for name in ("timeout", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                return f"webhook {name} must be a positive number of seconds"
        return None


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def event_body(event_id_: str, campaign_id: int, event: Mapping[str, Any]) -> bytes:
    """What a webhook receives: the EVENT with ``id`` and ``campaign_id``, as JSON."""
    body = {"id": event_id_, "campaign_id": campaign_id, **event}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class Owed:
    """An event fired and not yet delivered to every webhook in ``targets``."""

    id: str
    campaign_id: int
    event: Event
    targets: set[str]


@dataclass(slots=True)
class OutboxCounters:
    delivered: int = 0
    failed: int = 0  # attempts that failed (each is retried)
    dropped: int = 0  # owed to a webhook no longer configured (at start)
    write_errors: int = 0


class Outbox:
    """The goals' durable log and the events owed to webhooks. In memory only without a path."""

    def __init__(self, path: Path | None, urls: tuple[str, ...] = ()) -> None:
        self.path = path
        self.urls = urls
        self.owed: dict[str, Owed] = {}
        self.counters = OutboxCounters()
        self._log: MetricsLog | None = None
        self._replay: list[Record] = []
        self._wake: dict[str, asyncio.Event] = {}
        if path is not None:
            # fsynced where durability is promised (events, goals), by hand: see _commit
            self._log, self._replay = MetricsLog.open(path, policy="no")
            self._load(self._replay)

    def _load(self, records: list[Record]) -> None:
        urls = set(self.urls)
        for record in records:
            body = record.body
            try:
                if record.kind == "e":
                    eid, cid, event, targets = body
                    keep = set(targets) & urls
                    self.counters.dropped += len(set(targets) - urls)
                    if keep:
                        self.owed[eid] = Owed(eid, cid, event, keep)
                elif record.kind == "d":
                    eid, url = body
                    owed = self.owed.get(eid)
                    if owed is not None:
                        owed.targets.discard(url)
                        if not owed.targets:
                            del self.owed[eid]
            except (TypeError, ValueError) as exc:
                log.warning(
                    "goals.log.bad_record", seq=record.seq, kind=record.kind, error=str(exc)
                )
        if self.owed or records:
            log.info(
                "goals.log.loaded",
                path=str(self.path),
                records=len(records),
                owed=len(self.owed),
                dropped_targets=self.counters.dropped,
            )

    def replay_into(self, keeper: GoalKeeper) -> None:
        """Apply the goals set and the events fired since the snapshot (once, at start)."""
        records, self._replay = self._replay, []
        for record in records:
            try:
                if record.kind == "e":
                    _, cid, event, _ = record.body
                    keeper.remember(int(cid), event)
                elif record.kind == "g":
                    cid, supporters, area, reached, area_reached = record.body
                    spec = check_goals({"supporters": supporters, "area": area})
                    if isinstance(spec, Exception):
                        raise ValueError(str(spec))
                    keeper.set_goals(int(cid), spec, None)
                    keeper.note(int(cid))  # a campaign with goals is not unknown
                    problems = keeper.load_snapshot(
                        {"reached": [[cid, reached]], "area_reached": [[cid, area_reached]]}
                    )
                    if problems:
                        raise ValueError("; ".join(problems))
            except (TypeError, ValueError, KeyError) as exc:
                log.warning(
                    "goals.log.bad_record", seq=record.seq, kind=record.kind, error=str(exc)
                )

    # -- the actor's side -----------------------------------------------------------------------

    def record_goals(self, campaign_id: int, spec: GoalsSpec, keeper: GoalKeeper) -> None:
        """Make a ``set_goals`` durable (raises OSError when the log cannot be written)."""
        if self._log is None:
            return
        reached = sorted(keeper.reached.get(campaign_id, ()))
        areas = {a: sorted(t) for a, t in keeper.area_reached.get(campaign_id, {}).items()}
        area = None if spec.area is None else dict(spec.area)
        supporters = None if spec.supporters is None else list(spec.supporters)
        self._log.append("g", [campaign_id, supporters, area, reached, areas])
        self._commit(sync=True)

    def fire(self, events: list[tuple[int, Event]]) -> None:
        """Record fired events (written and fsynced before this returns) and owe them to every
        webhook. A write error is logged and counted: the events still go out from memory."""
        targets = list(self.urls)
        for cid, event in events:
            eid = event_id(cid, event)
            if self._log is not None:
                self._log.append("e", [eid, cid, event, targets])
            if targets:
                self.owed[eid] = Owed(eid, cid, event, set(targets))
        if self._log is not None:
            try:
                self._commit(sync=True)
            except OSError as exc:
                self.counters.write_errors += 1
                log.error("goals.log.write_failed", path=str(self.path), error=repr(exc))
        for url in targets:
            self._waker(url).set()

    def _commit(self, *, sync: bool = False) -> None:
        """Write what is appended (it then survives ``kill -9``); with ``sync``, fsync it too
        (it then survives a power loss)."""
        assert self._log is not None
        try:
            self._log.commit()
            if sync:
                self._log.sync()
        except OSError:
            self._log.discard()
            raise

    # -- the sender's side ----------------------------------------------------------------------

    def next_for(self, url: str) -> Owed | None:
        """The oldest event still owed to ``url``."""
        for owed in self.owed.values():
            if url in owed.targets:
                return owed
        return None

    def delivered(self, owed: Owed, url: str) -> None:
        self.counters.delivered += 1
        owed.targets.discard(url)
        if not owed.targets:
            self.owed.pop(owed.id, None)
        if self._log is not None:
            try:
                self._log.append("d", [owed.id, url])
                self._commit()
            except OSError as exc:  # delivered again after a restart: the id deduplicates
                self.counters.write_errors += 1
                log.error("goals.log.write_failed", path=str(self.path), error=repr(exc))

    async def wait_for(self, url: str) -> None:
        waker = self._waker(url)
        await waker.wait()
        waker.clear()

    def _waker(self, url: str) -> asyncio.Event:
        waker = self._wake.get(url)
        if waker is None:
            waker = self._wake[url] = asyncio.Event()
        return waker

    # -- compaction and info --------------------------------------------------------------------

    def compact(self) -> None:
        """After a snapshot holds the goals: keep only the events still owed."""
        if self._log is None:
            return
        try:
            self._log.commit()
            mark = self._log.mark()
            for owed in self.owed.values():
                self._log.append("e", [owed.id, owed.campaign_id, owed.event, sorted(owed.targets)])
            self._commit(sync=True)
            self._log.drop_through(mark)
        except OSError as exc:
            log.error("goals.log.compact_failed", path=str(self.path), error=repr(exc))

    def close(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()

    def info(self) -> dict[str, int]:
        c = self.counters
        return {
            "urls": len(self.urls),
            "delivered": c.delivered,
            "failed": c.failed,
            "pending": sum(len(o.targets) for o in self.owed.values()),
            "log_write_errors": c.write_errors,
        }


@dataclass
class WebhookSender:
    """Posts the outbox's events to the webhooks; one worker per URL (see the module doc)."""

    outbox: Outbox
    config: WebhookConfig
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self) -> None:
        """Deliver until cancelled. An unexpected error is logged, never raised: in the
        service's task group it would stop the actor too."""
        try:
            await self._run()
        except Exception:
            log.exception("webhook.sender_failed")

    async def _run(self) -> None:
        import httpx  # the server extra: only a server with webhooks needs it

        headers = {"User-Agent": f"campaignstats/{__version__}"}
        async with (
            httpx.AsyncClient(timeout=self.config.timeout, headers=headers) as client,
            asyncio.TaskGroup() as group,
        ):
            for url in self.config.urls:
                group.create_task(self._worker(client, url), name=f"webhook {url}")

    async def _worker(self, client: Any, url: str) -> None:
        failures = 0
        outbox = self.outbox
        while True:
            owed = outbox.next_for(url)
            if owed is None:
                await outbox.wait_for(url)
                continue
            error = await self._post(client, url, owed)
            if error is None:
                failures = 0
                outbox.delivered(owed, url)
                log.info("webhook.delivered", url=url, event_id=owed.id)
                continue
            failures += 1
            outbox.counters.failed += 1
            doublings = min(failures - 1, 30)
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2.0**doublings)
            delay *= random.uniform(0.5, 1.0)  # jitter: receivers coming back are not stampeded
            log.warning(
                "webhook.failed",
                url=url,
                event_id=owed.id,
                error=error,
                failures_in_row=failures,
                retry_in=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _post(self, client: Any, url: str, owed: Owed) -> str | None:
        body = event_body(owed.id, owed.campaign_id, owed.event)
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: owed.id,
            EVENT_TYPE_HEADER: str(owed.event.get("type")),
        }
        if self.config.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.config.secret, body)
        try:
            response = await client.post(url, content=body, headers=headers)
        except Exception as exc:  # connection refused, timeout, ...: retried
            return repr(exc)
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"


__all__ = [
    "EVENT_ID_HEADER",
    "SECRET_ENV",
    "SIGNATURE_HEADER",
    "Outbox",
    "WebhookConfig",
    "WebhookSender",
    "event_body",
    "sign",
]
