"""Operations: readiness from ``info``, and Prometheus metrics read from ``info`` at scrape time.

Nothing in the actor is instrumented for Prometheus: ``info`` already counts what an operator
needs (docs/protocol.md, "Info"), so a scrape asks the service for it once and turns it into
metric families with the official ``prometheus_client``. The only counter kept here is the one
the actor cannot know: HTTP requests by route and status.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from campaignstats.http.events import EventHub

PREFIX = "campaignstats_"


def is_ready(info: Mapping[str, Any]) -> bool:
    """Counts are worth serving: a full calculation has been merged since the actor started,
    or the actor says it loaded a snapshot (``calculations.snapshot_loaded``, where reported)."""
    calculations = info.get("calculations") or {}
    return bool(calculations.get("loaded") or calculations.get("snapshot_loaded"))


class _InfoCollector(Collector):
    """Metric families from the last ``info`` the handler fetched (set just before the scrape
    is written, with no await in between, so one scrape is one ``info``)."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub
        self.info: Mapping[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        info = self.info
        if not info:
            return

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, text, value=value)

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, text, value=value)

        yield gauge("ready", "1 once a full calculation or a snapshot is loaded", is_ready(info))
        yield gauge("uptime_seconds", "seconds since the service started", info.get("uptime", 0))
        yield gauge("campaigns", "campaigns held in memory", info.get("campaigns", 0))
        yield counter("increments_applied", "increments applied", info.get("increments_applied", 0))
        yield counter("decrements_applied", "decrements applied", info.get("decrements_applied", 0))
        yield counter(
            "increments_rejected",
            "increments and messages rejected (invalid, over a limit)",
            info.get("rejected", 0),
        )
        yield counter("clamped", "decrements clamped at zero", info.get("clamped", 0))
        yield counter(
            "already_counted",
            "changes skipped because a merged calculation had counted them",
            info.get("already_counted", 0),
        )
        mailbox = info.get("mailbox") or {}
        yield gauge(
            "mailbox_depth", "messages waiting in the actor's mailbox", mailbox.get("depth", 0)
        )
        yield gauge(
            "mailbox_capacity", "the mailbox's bound, in messages", mailbox.get("capacity", 0)
        )
        yield gauge(
            "mailbox_blocked_producers",
            "producers waiting for room in the mailbox",
            mailbox.get("blocked_producers", 0),
        )
        calculations = info.get("calculations") or {}
        by_outcome = CounterMetricFamily(
            PREFIX + "calculations", "calculations from Postgres by outcome", labels=["outcome"]
        )
        for outcome in ("completed", "failed", "skipped"):
            by_outcome.add_metric([outcome], calculations.get(outcome, 0))
        yield by_outcome
        yield gauge(
            "calculation_running",
            "1 while a calculation runs",
            calculations.get("running") is not None,
        )
        last = info.get("last_calculation") or {}
        duration = GaugeMetricFamily(
            PREFIX + "last_calculation_duration_seconds",
            "duration of the last completed calculation (its SQL), by kind",
            labels=["kind"],
        )
        if last:
            duration.add_metric([str(last.get("kind", ""))], last.get("duration", 0.0))
        yield duration
        drift = last.get("drift") or {}
        yield gauge(
            "drift_campaigns",
            "campaigns whose memory differed from the last calculation",
            drift.get("campaigns", 0),
        )
        yield gauge(
            "drift_supporters",
            "sum of |memory - database| of supporters at the last merge",
            drift.get("supporters", 0),
        )
        yield gauge(
            "drift_actions",
            "sum of |memory - database| of actions at the last merge",
            drift.get("actions", 0),
        )
        yield counter(
            "actor_restarts", "restarts of the actor by its supervisor", info.get("restarts", 0)
        )
        goals = info.get("goals") or {}
        yield counter(
            "goal_events",
            "milestone and quorum events fired (docs/design.md)",
            goals.get("fired", 0),
        )
        hooks = goals.get("webhooks") or {}
        deliveries = CounterMetricFamily(
            PREFIX + "webhook_deliveries", "webhook POSTs by outcome", labels=["outcome"]
        )
        for outcome in ("delivered", "failed", "dead"):  # dead: refused for good (4xx)
            deliveries.add_metric([outcome], hooks.get(outcome, 0))
        yield deliveries
        yield gauge(
            "webhook_pending",
            "deliveries owed to webhooks (in the outbox)",
            hooks.get("pending", 0),
        )
        yield gauge(
            "subscriptions", "subscriptions to campaign changes", info.get("subscriptions", 0)
        )
        connections = GaugeMetricFamily(
            PREFIX + "connections", "open connections by listener", labels=["listener"]
        )
        server = info.get("server")
        if server:
            connections.add_metric(["socket"], server.get("connections", 0))
        connections.add_metric(["http_events"], self.hub.streams)
        yield connections
        if server:
            yield counter(
                "socket_refused_connections",
                "socket connections refused (too many)",
                server.get("refused_connections", 0),
            )
            yield counter(
                "socket_closed_slow_readers",
                "socket connections closed for not reading their replies",
                server.get("closed_slow_readers", 0),
            )
        counters = self.hub.counters
        yield counter("http_event_streams_opened", "event streams opened", counters.opened)
        yield counter(
            "http_event_streams_dropped",
            "event streams dropped as slow readers",
            counters.dropped_slow,
        )
        yield counter(
            "http_event_streams_refused", "event streams refused (too many)", counters.refused
        )
        yield gauge(
            "http_event_campaigns",
            "campaigns followed by at least one event stream",
            self.hub.campaigns,
        )
        follower = info.get("follower")
        if follower:  # serve --follow (docs/follow.md)
            yield gauge("follower_running", "1 while the follower runs", bool(follower["running"]))
            yield gauge(
                "follower_lag_bytes",
                "WAL the replication slot retains behind the database",
                follower.get("lag_bytes") or 0,
            )
            yield gauge(
                "follower_lag_seconds",
                "age of the oldest change not applied yet",
                follower.get("lag_seconds") or 0,
            )
            yield gauge(
                "follower_last_latency_seconds",
                "commit to applied, the last round",
                follower.get("last_latency") or 0,
            )
            yield counter(
                "follower_transactions", "transactions followed", follower.get("transactions", 0)
            )
            yield counter(
                "follower_inexact",
                "changes left to the next calculation",
                follower.get("inexact", 0),
            )
            yield counter("follower_errors", "rounds that failed", follower.get("errors", 0))


class Metrics:
    """The registry of one HTTP app: its request counter and the ``info`` collector."""

    def __init__(self, hub: EventHub) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self._info = _InfoCollector(hub)
        self.registry.register(self._info)

    def render(self, info: Mapping[str, Any]) -> bytes:
        from prometheus_client import generate_latest

        self._info.info = info
        try:
            return generate_latest(self.registry)
        finally:
            self._info.info = {}
