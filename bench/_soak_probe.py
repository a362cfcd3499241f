"""The soak's eyes inside the server process: ``campaignstats serve`` with a sampling thread.

    python -m bench._soak_probe OUT.jsonl SECONDS <campaignstats arguments...>

Every ``SECONDS`` a daemon thread appends one JSON line to ``OUT.jsonl``: the process's RSS;
Python's small-object allocator, from ``sys._debugmallocstats()`` (bytes in allocated blocks,
bytes in free blocks of its pools, and the arenas it holds from the system: what it has
*reserved*); ``sys.getallocatedblocks()``; the garbage collector's counts and tracked objects;
per connection, what it holds (the decoder's buffer, the bytes of an unfinished message, the
transport's write buffer, the mailbox backlog, the replies waiting); and the actor's journal
(changes kept one by one, folded keys, its size against the limit). Then it runs the command
line as ``campaignstats`` would (bench/soak.py starts the server this way).

The thread reads the server's objects without the event loop (found once through ``gc``); a
read that races with the loop (a dict changing size) is retried at the next sample. Each
sample holds the GIL for a few milliseconds (the allocator's report); every sixth also walks
every object (``gc.get_objects``, counts by type), which takes longer with more objects.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

_STAT = re.compile(r"^# ([a-z ]+?)\s+=\s+([\d,]+)$")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_stats() -> dict[str, int]:
    """The allocator's own figures: its report goes to the C stderr, so fd 2 is pointed at a
    file for the call (a log line written at that instant lands there and is skipped)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as out:
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    figures: dict[str, int] = {}
    arenas_total = None
    for line in text.splitlines():
        match = _STAT.match(line.strip())
        if match:
            figures.setdefault(match.group(1), int(match.group(2).replace(",", "")))
        elif line.startswith("Total") and arenas_total is None:
            arenas_total = int(line.split("=")[1].strip().replace(",", ""))
    figures["arenas bytes"] = arenas_total or 0
    return figures


class _Finder:
    """The server's objects, found once through the garbage collector."""

    def __init__(self) -> None:
        self.server: Any = None
        self.state: Any = None
        self.samples = 0

    def find(self) -> None:
        if self.server is not None and self.state is not None:
            return
        from campaignstats.model import StatsState
        from campaignstats.server import StatsServer

        for obj in gc.get_objects():
            if self.server is None and type(obj) is StatsServer:
                self.server = obj
            elif type(obj) is StatsState:
                self.state = obj  # the newest one: a restarted actor keeps its state object


def _connections(server: Any) -> dict[str, Any]:
    held: list[int] = []
    buffers: list[int] = []
    writes: list[int] = []
    backlogs: list[int] = []
    pending: list[int] = []
    for conn in list(server.connections):
        decoder = conn.session.codec._decoder
        buffers.append(len(decoder._buf))
        held.append(max(0, decoder._fed - decoder._start))
        transport = conn.transport
        writes.append(0 if transport is None else transport.get_write_buffer_size())
        backlogs.append(len(conn.producer._backlog))
        pending.append(len(conn.session._pending))

    def both(values: list[int]) -> dict[str, int]:
        return {"sum": sum(values), "max": max(values, default=0)}

    return {
        "count": len(held),
        "decoder_buffer_bytes": both(buffers),
        "unfinished_message_bytes": both(held),
        "write_buffer_bytes": both(writes),
        "backlog_messages": both(backlogs),
        "pending_replies": both(pending),
    }


def _journal(state: Any) -> dict[str, Any]:
    journal = state.journal
    folds = getattr(state, "journal_folds", None)
    return {
        "running": journal is not None,
        "listed": 0 if journal is None else sum(len(v) for v in list(journal.values())),
        "folded_campaigns": 0 if not folds else len(folds),
        "size": state.journal_size,
        "limit": state.journal_limit,
        "horizon_known": getattr(state, "journal_horizon", None) is not None,
    }


def sample(finder: _Finder, t0: float) -> dict[str, Any]:
    t = time.monotonic()
    row: dict[str, Any] = {"t": round(t - t0, 1), "rss_bytes": _rss_bytes()}
    stats = _malloc_stats()
    row["malloc_stats_ms"] = round((time.monotonic() - t) * 1000, 1)
    row["py_allocated_bytes"] = stats.get("bytes in allocated blocks", 0)
    row["py_free_in_pools_bytes"] = stats.get("bytes in available blocks", 0)
    row["py_arenas_bytes"] = stats["arenas bytes"]
    row["py_arenas_current"] = stats.get("arenas allocated current", 0)
    row["py_arenas_highwater"] = stats.get("arenas highwater mark", 0)
    row["py_allocated_blocks"] = sys.getallocatedblocks()
    row["gc_counts"] = list(gc.get_count())
    # objects frozen (serve freezes what is alive at start, once: a count that grows would be
    # objects the collector no longer walks), and passes run per generation since start
    row["gc_frozen"] = gc.get_freeze_count()
    row["gc_passes"] = [g["collections"] for g in gc.get_stats()]
    row["gc_collected"] = [g["collected"] for g in gc.get_stats()]
    if finder.samples % 6 == 0:  # a walk over every object: not every sample
        objects = gc.get_objects()
        row["gc_objects"] = len(objects)
        kinds = Counter(type(o).__name__ for o in objects)
        del objects
        row["gc_top_types"] = dict(kinds.most_common(8))
    finder.samples += 1
    try:
        finder.find()
        if finder.server is not None:
            row["connections"] = _connections(finder.server)
        if finder.state is not None:
            row["journal"] = _journal(finder.state)
    except (RuntimeError, AttributeError) as exc:  # raced with the loop, or not up yet
        row["probe_error"] = f"{type(exc).__name__}: {exc}"
    row["sample_ms"] = round((time.monotonic() - t) * 1000, 1)
    return row


def _run(out: Path, every: float) -> None:
    finder = _Finder()
    t0 = time.monotonic()
    with out.open("a") as f:
        while True:
            with contextlib.suppress(Exception):  # a probe never takes the server down
                f.write(json.dumps(sample(finder, t0)) + "\n")
                f.flush()
            time.sleep(every)


def main() -> int:
    out, every, *argv = sys.argv[1:]
    thread = threading.Thread(target=_run, args=(Path(out), float(every)), daemon=True)
    thread.start()
    from campaignstats.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
