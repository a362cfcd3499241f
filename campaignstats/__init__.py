"""campaignstats: live counters for campaigning platforms.

Counts per campaign live in memory inside one actor; web backends send increments over a
MessagePack socket; a periodic calculation from Postgres keeps memory honest.

The embedding API is imported lazily, so that ``import campaignstats.model`` (the pure ground
floor) does not drag asyncio and the database driver in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from campaignstats._version import __version__

if TYPE_CHECKING:
    from campaignstats.model import Increment
    from campaignstats.service import StatsService, open_stats

__all__ = ["Increment", "StatsService", "__version__", "open_stats"]


def __getattr__(name: str) -> Any:
    if name in ("open_stats", "StatsService"):
        from campaignstats import service

        return getattr(service, name)
    if name == "Increment":
        from campaignstats.model import Increment

        return Increment
    raise AttributeError(f"module 'campaignstats' has no attribute {name!r}")
