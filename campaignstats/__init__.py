"""campaignstats: live counters for campaigning platforms.

Counts per campaign live in memory inside one actor; web backends send increments over a
MessagePack socket; a periodic calculation from Postgres keeps memory honest.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
