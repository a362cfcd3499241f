"""The snapshot file: the counts written at shutdown, read at start so answers come at once.

MessagePack, written atomically (:func:`campaignstats.files.atomic_write`: temporary file,
fsync, rename), so a crash while writing leaves the previous snapshot intact. A snapshot is
only a head start: the full calculation that follows every start replaces what it covers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import structlog

from campaignstats.files import atomic_write
from campaignstats.model import CampaignStats

log = structlog.get_logger(__name__)

#: 2: rows gain messages; 3: a "goals" part (campaignstats.goals: goals set, thresholds reached).
#: Files of formats 1 and 2 are still read (with no goals part).
FORMAT = 3
_READABLE = (1, 2, 3)


def save_snapshot(
    path: Path, campaigns: dict[int, CampaignStats], goals: dict[str, Any] | None = None
) -> None:
    rows = [
        (cid, s.supporters, *s.maps(), s.extra_supporters, s.messages)  # packed stay packed
        for cid, s in campaigns.items()
    ]
    content: dict[str, Any] = {"format": FORMAT, "saved_at": time.time(), "campaigns": rows}
    if goals is not None:
        content["goals"] = goals
    data = msgpack.packb(content)
    atomic_write(path, data)
    log.info("snapshot.saved", path=str(path), campaigns=len(rows), bytes=len(data))


def load_snapshot(path: Path) -> dict[int, CampaignStats] | None:
    """The campaigns of a snapshot file; None (logged) when missing or unreadable."""
    loaded = load_snapshot_with_goals(path)
    return None if loaded is None else loaded[0]


def load_snapshot_with_goals(
    path: Path,
) -> tuple[dict[int, CampaignStats], dict[str, Any] | None] | None:
    """The campaigns of a snapshot file and its goals part (None before format 3); None
    (logged) when missing or unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        log.info("snapshot.missing", path=str(path))
        return None
    except OSError as exc:  # a directory, no permission...: ignored, never fatal
        log.error("snapshot.unreadable", path=str(path), error=repr(exc))
        return None
    try:
        data = msgpack.unpackb(raw, strict_map_key=False)
        if type(data) is not dict or data.get("format") not in _READABLE:
            raise ValueError("not a campaignstats snapshot, or an unknown format")
        campaigns = {}
        for row in data["campaigns"]:
            cid, sup, action, area, org, extra, *rest = row
            messages = rest[0] if rest else 0
            campaigns[_id(cid)] = CampaignStats(
                _count(sup),
                _counts(action, str),
                _counts(area, str),
                _counts(org, int),
                _count(extra),
                _count(messages),
            )
        goals = data.get("goals")
        if goals is not None and type(goals) is not dict:
            raise ValueError("the goals part is not a map")
    except Exception as exc:  # a damaged file must not keep the server from starting
        log.error("snapshot.unreadable", path=str(path), error=repr(exc))
        return None
    log.info(
        "snapshot.loaded",
        path=str(path),
        campaigns=len(campaigns),
        age_seconds=round(time.time() - float(data.get("saved_at", 0)), 1),
    )
    return campaigns, goals


# A snapshot that decodes is still checked value by value: a wrong type loaded into the state
# would crash the actor at its first increment, and again after every restart.


def _id(value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"a campaign id must be a positive integer, not {value!r}")
    return value


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"a count must be a non-negative integer, not {value!r}")
    return value


def _counts(value: object, key_type: type) -> dict[Any, int]:
    if type(value) is not dict:
        raise ValueError(f"counts must be a map, not {type(value).__name__}")
    for key, n in value.items():
        if type(key) is not key_type:
            raise ValueError(f"a key must be {key_type.__name__}, not {key!r}")
        if type(n) is not int or n <= 0:
            raise ValueError(f"a count must be a positive integer, not {n!r}")
    return dict(value)
