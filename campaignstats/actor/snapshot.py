"""The snapshot file: the counts written at shutdown, read at start so answers come at once.

MessagePack, written atomically (temporary file, fsync, rename), so a crash while writing leaves
the previous snapshot intact. A snapshot is only a head start: the full calculation that follows
every start replaces what it covers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import structlog

from campaignstats.model import CampaignStats

log = structlog.get_logger(__name__)

FORMAT = 1


def save_snapshot(path: Path, campaigns: dict[int, CampaignStats]) -> None:
    rows = [
        (cid, s.supporters, s.action, s.area, s.org, s.extra_supporters)
        for cid, s in campaigns.items()
    ]
    data = msgpack.packb({"format": FORMAT, "saved_at": time.time(), "campaigns": rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("snapshot.saved", path=str(path), campaigns=len(rows), bytes=len(data))


def load_snapshot(path: Path) -> dict[int, CampaignStats] | None:
    """The campaigns of a snapshot file; None (logged) when missing or unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        log.info("snapshot.missing", path=str(path))
        return None
    try:
        data = msgpack.unpackb(raw, strict_map_key=False)
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown snapshot format {data.get('format')!r}")
        campaigns = {
            int(cid): CampaignStats(int(sup), dict(action), dict(area), dict(org), int(extra))
            for cid, sup, action, area, org, extra in data["campaigns"]
        }
    except Exception as exc:  # a damaged file must not keep the server from starting
        log.error("snapshot.unreadable", path=str(path), error=repr(exc))
        return None
    log.info(
        "snapshot.loaded",
        path=str(path),
        campaigns=len(campaigns),
        age_seconds=round(time.time() - float(data.get("saved_at", 0)), 1),
    )
    return campaigns
