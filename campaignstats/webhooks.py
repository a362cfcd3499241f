"""The goals' durable log (the outbox) and the webhook deliveries (docs/design.md, "Webhooks").

:class:`Outbox` is an append-only file in the format of the metrics log
(:class:`campaignstats.metrics.log.MetricsLog`). It holds:

* ``e`` ``[id, campaign_id, EVENT, [url, ...]]``: an event fired, and the webhooks it is owed to.
  The actor appends it (and fsyncs) before the event counts as fired: before it is pushed to a
  subscriber and before the keeper's memory of it could be lost with the process;
* ``d`` ``[id, url]``: the event was delivered to that webhook. Written at once but not
  fsynced (the sender must not stall the event loop the actor shares): a power loss may forget
  a delivery, which is then made again, with the same id;
* ``x`` ``[id, url, reason]``: the webhook refused the event for good (a 4xx other than 408 and
  429, :data:`GIVE_UP_AFTER` times in a row): it is dead for that webhook, owed no more (as
  ``d``, and counted apart);
* ``g`` ``[campaign_id, supporters, area, reached, area_reached]``: goals set with ``set_goals``,
  with what they recorded as reached at once.

At start the records are replayed over the snapshot (the goals, what was reached) and the events
not delivered to every webhook are delivered again. A torn tail (``kill -9`` while writing) is cut
off with a warning, as the metrics log does. When the snapshot has been written (at stop) the log
is rewritten with only the events still owed (copied first, then the old records dropped: a crash
in between leaves both, which replay the same).

:class:`WebhookSender` runs in the service's task host: one worker per webhook URL, each posting
the events owed to it in order, retrying a failure with exponential backoff and jitter (bounded
by ``backoff_max``). A failure that may pass (no answer, a timeout, a 5xx, 408, 429) is retried
forever: the event stays in the outbox until delivered. A 4xx other than 408 and 429 is the
receiver refusing this event: after :data:`GIVE_UP_AFTER` of them in a row the event is parked
as dead for that webhook (logged, counted) and the next one goes, so one bad event does not
block the webhook forever. Each POST, answer included, has ``timeout`` seconds in all, and its
answer's body is never read: the status line decides. A URL is logged redacted
(:func:`redact_url`: no password, no query). The actor never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from campaignstats._version import __version__
from campaignstats.goals import Event, GoalKeeper, GoalsSpec, check_goals, event_id
from campaignstats.metrics.log import MetricsLog, Record

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Campaignstats-Signature"
EVENT_ID_HEADER = "X-Campaignstats-Event-Id"
EVENT_TYPE_HEADER = "X-Campaignstats-Event"
SECRET_ENV = "CAMPAIGNSTATS_WEBHOOK_SECRET"
#: 4xx answers (other than 408 and 429) in a row to one event before it is dead for the webhook
GIVE_UP_AFTER = 5
#: 4xx statuses that may pass: retried forever, as 5xx
_RETRIED_4XX = (408, 429)


def redact_url(url: str) -> str:
    """A webhook URL as it may be logged: the userinfo's password (or a user alone, which may be
    a token) and the query replaced by ``***``, the fragment dropped."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a malformed URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    query = "?***" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


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
            shown = redact_url(url)
            if not url.startswith(("http://", "https://")):
                if "://" not in url:  # no URL at all: redact_url would make one up
                    return "a webhook must be an http:// or https:// URL (one was not a URL)"
                return f"a webhook must be an http:// or https:// URL, not {shown!r}"
            problem = _url_problem(url)
            if problem is not None:
                return f"a webhook URL is malformed ({problem}): {shown!r}"
        if len(set(self.urls)) != len(self.urls):
            return "the same webhook URL is given twice"
        for name in ("timeout", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                return f"webhook {name} must be a positive number of seconds"
        return None


def _url_problem(url: str) -> str | None:
    """What httpx (which posts it) finds wrong with a URL, or None."""
    try:
        import httpx  # the server extra
    except ImportError:  # checked by the sender when it starts
        return None
    try:
        parsed = httpx.URL(url)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    if not parsed.host:
        return "no host"
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
    dead: int = 0  # refused for good by a webhook (4xx, GIVE_UP_AFTER times): owed no more
    write_errors: int = 0


class Outbox:
    """The goals' durable log and the events owed to webhooks. In memory only without a path."""

    def __init__(self, path: Path | None, urls: tuple[str, ...] = ()) -> None:
        self.path = path
        self.urls = urls
        self.owed: dict[str, Owed] = {}
        #: per webhook, the events owed to it in the order they fired (a delivery is O(1), however
        #: many events another webhook that is down is owed); an entry whose target was
        #: delivered is skipped when it reaches the front
        self._queues: dict[str, deque[Owed]] = {url: deque() for url in urls}
        #: deliveries owed, in all
        self._pending = 0
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
                elif record.kind in ("d", "x"):
                    eid, url, *_ = body
                    owed = self.owed.get(eid)
                    if owed is not None:
                        owed.targets.discard(url)
                        if not owed.targets:
                            del self.owed[eid]
            except (TypeError, ValueError) as exc:
                log.warning(
                    "goals.log.bad_record", seq=record.seq, kind=record.kind, error=str(exc)
                )
        for owed in self.owed.values():
            self._owe(owed)
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
            if targets and eid not in self.owed:  # each threshold fires once: never owed twice
                owed = self.owed[eid] = Owed(eid, cid, event, set(targets))
                self._owe(owed)
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

    def _owe(self, owed: Owed) -> None:
        for url in owed.targets:
            self._queues.setdefault(url, deque()).append(owed)
            self._pending += 1

    def next_for(self, url: str) -> Owed | None:
        """The oldest event still owed to ``url``."""
        queue = self._queues.get(url)
        if not queue:
            return None
        while queue and url not in queue[0].targets:
            queue.popleft()
        return queue[0] if queue else None

    def delivered(self, owed: Owed, url: str) -> None:
        """``url`` answered 2xx to the event."""
        self.counters.delivered += 1
        self._done(owed, url, "d", [owed.id, url])

    def dead(self, owed: Owed, url: str, reason: str) -> None:
        """``url`` refused the event for good: it is owed no more (logged and counted)."""
        self.counters.dead += 1
        log.error(
            "webhook.event_dead",
            url=redact_url(url),
            event_id=owed.id,
            reason=reason,
            hint="the receiver refused it; it is not retried",
        )
        self._done(owed, url, "x", [owed.id, url, reason])

    def _done(self, owed: Owed, url: str, kind: str, body: list[Any]) -> None:
        if url in owed.targets:
            owed.targets.discard(url)
            self._pending -= 1
        queue = self._queues.get(url)
        if queue and queue[0] is owed:
            queue.popleft()
        if not owed.targets:
            self.owed.pop(owed.id, None)
        if self._log is not None:
            try:
                self._log.append(kind, body)
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
            "pending": self._pending,
            "dead": c.dead,
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
                group.create_task(self._worker(client, url), name=f"webhook {redact_url(url)}")

    async def _worker(self, client: Any, url: str) -> None:
        failures = 0
        refusals = 0  # 4xx answers in a row to the event at the front
        outbox = self.outbox
        shown = redact_url(url)
        while True:
            owed = outbox.next_for(url)
            if owed is None:
                await outbox.wait_for(url)
                continue
            status, error = await self._post(client, url, owed)
            if error is None:
                failures = refusals = 0
                outbox.delivered(owed, url)
                log.info("webhook.delivered", url=shown, event_id=owed.id)
                continue
            failures += 1
            outbox.counters.failed += 1
            refused = status is not None and 400 <= status < 500 and status not in _RETRIED_4XX
            refusals = refusals + 1 if refused else 0
            if refusals >= GIVE_UP_AFTER:
                outbox.dead(owed, url, f"{error}, {refusals} times in a row")
                failures = refusals = 0
                continue
            doublings = min(failures - 1, 30)
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2.0**doublings)
            delay *= random.uniform(0.5, 1.0)  # jitter: receivers coming back are not stampeded
            log.warning(
                "webhook.failed",
                url=shown,
                event_id=owed.id,
                error=error,
                failures_in_row=failures,
                retry_in=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _post(self, client: Any, url: str, owed: Owed) -> tuple[int | None, str | None]:
        """POST the event: its status (None without an answer) and the error (None: 2xx). The
        whole exchange has ``timeout`` seconds (httpx's own timeout is per read, and a
        receiver that trickles its answer would never trip it); the body of the answer is not
        read (an endless one would be buffered without bound)."""
        body = event_body(owed.id, owed.campaign_id, owed.event)
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: owed.id,
            EVENT_TYPE_HEADER: str(owed.event.get("type")),
        }
        if self.config.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.config.secret, body)
        timeout = self.config.timeout
        try:
            async with (
                asyncio.timeout(timeout),
                client.stream("POST", url, content=body, headers=headers) as response,
            ):
                status: int = response.status_code
        except TimeoutError:
            return None, f"no complete answer within {timeout:g} s"
        except Exception as exc:  # connection refused, ...: retried
            return None, _redacted_error(exc, url)
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"


def _redacted_error(exc: Exception, url: str) -> str:
    """An exception as logged: httpx may quote the URL (with its password) in the message."""
    text = repr(exc)
    return text.replace(url, redact_url(url)) if url in text else text


__all__ = [
    "EVENT_ID_HEADER",
    "GIVE_UP_AFTER",
    "SECRET_ENV",
    "SIGNATURE_HEADER",
    "Outbox",
    "WebhookConfig",
    "WebhookSender",
    "event_body",
    "redact_url",
    "sign",
]
