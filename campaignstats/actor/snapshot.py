"""The snapshot file: the counts written at shutdown, read at start so answers come at once.

MessagePack, written atomically (:func:`campaignstats.files.atomic_write`: temporary file,
fsync, rename), so a crash while writing leaves the previous snapshot intact. A snapshot is
only a head start: the full calculation that follows every start replaces what it covers.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import structlog

from campaignstats.files import atomic_write
from campaignstats.model import CampaignStats

log = structlog.get_logger(__name__)

#: 2: rows gain messages; 3: a "goals" part (campaignstats.goals: goals set, thresholds reached).
#: Files of formats 1 and 2 are still read (with no goals part).
FORMAT = 3
_READABLE = (1, 2, 3)


#: bytes gathered before one write to the file while saving
_WRITE_CHUNK = 1 << 20
#: MessagePack's header of an array of three (a packed campaign's maps) and of seven (a row)
_ARRAY_OF_3 = 0x93
_ROW_HEADER = b"\x97"


def save_snapshot(
    path: Path, campaigns: dict[int, CampaignStats], goals: dict[str, Any] | None = None
) -> None:
    """Write the campaigns (and the goals part) atomically. The file is streamed row by row,
    and a packed campaign's maps are copied from its bytes (the same MessagePack a row holds),
    never decoded: decoding them all at once, with the whole file in memory, brought back at
    shutdown the memory of every campaign hot (docs/design.md, "Memory", round 3)."""
    packer = msgpack.Packer()
    pack = packer.pack
    written = 0

    def write(f: BinaryIO) -> None:
        nonlocal written
        out = bytearray()
        out += packer.pack_map_header(3 if goals is None else 4)
        out += pack("format") + pack(FORMAT) + pack("saved_at") + pack(time.time())
        out += pack("campaigns") + packer.pack_array_header(len(campaigns))
        for cid, s in campaigns.items():
            packed = s.packed
            if packed is None:
                packed = pack((s.action, s.area, s.org))
            if packed[0] != _ARRAY_OF_3:
                raise ValueError(f"campaign {cid}: its packed maps are not an array of three")
            out += _ROW_HEADER
            out += pack(cid)
            out += pack(s.supporters)
            out += memoryview(packed)[1:]
            out += pack(s.extra_supporters)
            out += pack(s.messages)
            if len(out) >= _WRITE_CHUNK:
                f.write(out)
                written += len(out)
                out.clear()
        if goals is not None:
            out += pack("goals") + pack(goals)
        f.write(out)
        written += len(out)

    atomic_write(path, write)
    log.info("snapshot.saved", path=str(path), campaigns=len(campaigns), bytes=written)


def load_snapshot(path: Path, packed: bool = False) -> dict[int, CampaignStats] | None:
    """The campaigns of a snapshot file; None (logged) when missing or unreadable."""
    loaded = load_snapshot_with_goals(path, packed)
    return None if loaded is None else loaded[0]


def load_snapshot_with_goals(
    path: Path, packed: bool = False
) -> tuple[dict[int, CampaignStats], dict[str, Any] | None] | None:
    """The campaigns of a snapshot file and its goals part (None before format 3); None
    (logged) when missing or unreadable. ``packed``: each campaign packed as its row is read
    (for a state that packs idle campaigns: docs/design.md, "Memory", round 3), its maps'
    bytes taken from the file as they are, so the dicts of every campaign are never alive at
    once (their memory stayed the process's after they were packed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        log.info("snapshot.missing", path=str(path))
        return None
    except OSError as exc:  # a directory, no permission...: ignored, never fatal
        log.error("snapshot.unreadable", path=str(path), error=repr(exc))
        return None
    try:
        if packed:
            data, campaigns = _read_packed(raw)
        else:
            data = msgpack.unpackb(raw, strict_map_key=False)
            campaigns = {}
        if type(data) is not dict or data.get("format") not in _READABLE:
            raise ValueError("not a campaignstats snapshot, or an unknown format")
        for row in [] if packed else data["campaigns"]:
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


def _read_packed(raw: bytes) -> tuple[dict[str, Any], dict[int, CampaignStats]]:
    """The file's top-level map without its campaigns, and the campaigns packed row by row
    (each row's maps checked as :func:`load_snapshot_with_goals` checks them, then dropped)."""
    # Read from a view of the file's bytes (fed, the unpacker would hold a copy of them all)
    unpacker = msgpack.Unpacker(
        io.BytesIO(raw), strict_map_key=False, max_buffer_size=max(len(raw), 1)
    )
    data: dict[str, Any] = {}
    campaigns: dict[int, CampaignStats] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key != "campaigns":
            data[key] = unpacker.unpack()
            continue
        data[key] = None
        for _ in range(unpacker.read_array_header()):
            fields = unpacker.read_array_header()
            if fields < 6:
                raise ValueError(f"a row has {fields} fields, not 6 or more")
            cid = _id(unpacker.unpack())
            supporters = _count(unpacker.unpack())
            start = unpacker.tell()
            _counts(unpacker.unpack(), str)
            _counts(unpacker.unpack(), str)
            _counts(unpacker.unpack(), int)
            maps = _ARRAY_OF_3.to_bytes(1, "big") + raw[start : unpacker.tell()]
            extra = _count(unpacker.unpack())
            messages = _count(unpacker.unpack()) if fields >= 7 else 0
            for _ in range(fields - 7):
                unpacker.skip()
            campaigns[cid] = CampaignStats.from_packed(supporters, maps, extra, messages)
    if "campaigns" not in data:
        raise ValueError("no campaigns")
    return data, campaigns


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
