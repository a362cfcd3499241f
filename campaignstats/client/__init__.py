"""Clients of the campaignstats server, for web backends.

:class:`AsyncStatsClient` for asyncio code (FastAPI, aiohttp), :class:`StatsClient` for threaded
code (Django, Flask, gunicorn). Both take a URL (``tcp://host:port``, port 7400 by default, or
``unix:///path/to/socket``) and offer the same calls; ``increment()`` never blocks for long and
never raises because the server is down (see shared/DESIGN.md, "Around the actor").

The clients speak shared/PROTOCOL.md through :class:`~campaignstats.protocol.ClientCodec` and
import nothing from the actor, the service or the server.
"""

from __future__ import annotations

from campaignstats.client._common import (
    CLIENT_NAME,
    DEFAULT_PORT,
    ClientStatistics,
)
from campaignstats.client.aio import AsyncStatsClient, Subscription
from campaignstats.client.blocking import StatsClient
from campaignstats.errors import CallTimeout, ClientClosed, ConnectTimeout, ServerUnavailable

__all__ = [
    "CLIENT_NAME",
    "DEFAULT_PORT",
    "AsyncStatsClient",
    "CallTimeout",
    "ClientClosed",
    "ClientStatistics",
    "ConnectTimeout",
    "ServerUnavailable",
    "StatsClient",
    "Subscription",
]
