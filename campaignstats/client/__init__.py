"""Clients of the campaignstats server, for web backends.

:class:`AsyncStatsClient` for asyncio code (FastAPI, aiohttp), :class:`StatsClient` for threaded
code (Django, Flask, gunicorn). Both take a URL (``tcp://host:port``, port 7400 by default, or
``unix:///path/to/socket``) and offer the same calls and options; ``increment()`` never blocks
for long and never raises because the server is down (docs/design.md, "Around the actor").

Both are thin adapters over one sans-IO :class:`~campaignstats.sessions.client.ClientSession`
(docs/protocol.md), differing only in how they wait, and import nothing from the actor, the
service or the server.
"""

from __future__ import annotations

from campaignstats.client._common import DEFAULT_PORT, ClientStatistics
from campaignstats.client.aio import AsyncStatsClient, Subscription
from campaignstats.client.blocking import StatsClient
from campaignstats.client.blocking import Subscription as BlockingSubscription
from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.errors import CallTimeout, ClientClosed, ConnectTimeout, ServerUnavailable
from campaignstats.model import Increment
from campaignstats.sessions.client import CLIENT_NAME

__all__ = [
    "CLIENT_NAME",
    "DEFAULT_PORT",
    "AsyncRoutingClient",
    "AsyncStatsClient",
    "BlockingSubscription",
    "CallTimeout",
    "ClientClosed",
    "ClientStatistics",
    "ConnectTimeout",
    "Increment",
    "RoutingClient",
    "ServerUnavailable",
    "StatsClient",
    "Subscription",
]
