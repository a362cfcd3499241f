"""Benchmark: where a campaign's memory goes (docs/design.md, "Memory").

    python -m bench.memory                    # 10,000 typical campaigns, about 10 seconds
    python -m bench.memory --campaigns 100000 --spread 10 --top
    python -m bench.memory --redis            # bench.run's memory rows alone, Redis included
    python -m bench.memory --idle             # the same campaigns once the sweep packed them

In one process, on StatsState directly: the typical campaign of ``bench.run``'s memory row (10
new supporters, 5 action types, 10 areas, 3 orgs; fresh strings, as decoded), applied one
campaign per batch as the bench does. Then, per campaign:

* RSS growth and tracemalloc's growth (what the allocator handed out);
* a breakdown by structure: ``sys.getsizeof`` of each object the state holds for its campaigns
  (containers, key strings counted once per distinct object), divided by the campaigns.

``--spread M`` files the campaign's 10 actions over M distinct minutes (the buckets of a
campaign that was active for a while); ``--top`` calls ``top`` once, so that the ranking holds
every campaign (as on a server that answers it). ``--varied``: campaigns with the same
counts but key sets of their own (3 orgs no other campaign has, their own 10 of 30 areas:
``bench._workers.varied_campaign``), as real campaigns have; a layout that only campaigns
sharing key sets benefit from shows here. ``--idle``: then the clock goes past
``pack_idle`` and the actor's sweep packs every campaign (docs/design.md, "Memory", round 3);
the figures are those of the packed state (tracemalloc and the breakdown: live bytes; the RSS
keeps what the freed dicts took). ``--redis`` measures only ``bench.run``'s memory
rows (workload 6, each size in a forked child, as bench.run does) and Redis's ``used_memory``
for the same campaigns, one hash each, in the same run; then the same for varied campaigns;
and ours once idle (``idle.`` rows: ``bench._workers.memory(idle=True)``, the campaigns going
idle a thousand at a time).
Writes JSON to bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from collections.abc import Iterable
from typing import Any

from bench import _redis, _workers
from bench._harness import append_result, in_child, machine, rss_bytes
from bench._workers import sweep_idle, typical_campaign, varied_campaign
from campaignstats.model import CampaignStats, Increment, StatsState

NOW = 1_750_000_000.0


def _size(objects: Iterable[object], seen: set[int]) -> int:
    """Bytes of the objects not counted yet (each object once, by identity)."""
    total = 0
    for obj in objects:
        if id(obj) not in seen:
            seen.add(id(obj))
            total += sys.getsizeof(obj)
    return total


def breakdown(state: StatsState, n: int) -> dict[str, float]:
    """Bytes per campaign of each structure (see the module doc)."""
    seen: set[int] = set()
    campaigns = list(state.campaigns.values())
    parts: dict[str, int] = {}
    parts["campaigns dict + ids"] = _size([state.campaigns], seen) + _size(state.campaigns, seen)
    parts["CampaignStats"] = _size(campaigns, seen)
    # A packed campaign's maps are one bytes object (read through maps() they stay packed),
    # read in its slot: ``packed`` of one whose timeline is folded in is a copy of a part.
    # (Two passes: ``s not in hot`` compared campaigns with ``==`` one by one, quadratic.)
    hot = [s for s in campaigns if getattr(s, "packed", None) is None]
    slot = CampaignStats.__dict__["action"]
    packed = [s for s in campaigns if getattr(s, "packed", None) is not None]
    parts["packed maps (bytes)"] = _size((slot.__get__(s) for s in packed), seen)
    maps = [m for s in hot for m in (s.action, s.area, s.org)]
    parts["action/area/org maps"] = _size(maps, seen)
    for m in maps:  # a compact map's parts: its values and its (shared) layout
        parts["action/area/org maps"] += _size(getattr(m, "__dict__", {}).values(), seen)
    parts["key strings"] = _size((k for m in maps for k in m if type(k) is str), seen)
    parts["count ints (> 256)"] = _size((v for m in maps for v in m.values() if v > 256), seen)
    timelines = list(state.timelines.values())
    inner: list[object] = []
    for t in timelines:
        lazy = hasattr(type(t), "_series")  # a tree before lazy timelines has no _series
        series = getattr(t, "_series", None) if lazy else (t.minutes, t.hours, t.days)
        inner.append(t.last_action_at)
        if series is not None:
            inner.append(series)
            for s in series:
                inner.extend((s, s.data))
    parts["timelines dict"] = _size([state.timelines], seen)
    parts["Timeline objects"] = _size(timelines, seen)
    parts["series and arrays"] = _size(inner, seen)
    ranking = state.ranking
    parts["ranking (dirty, values, heap)"] = _size(
        [ranking.dirty, ranking.taken, ranking.values, ranking.heap, *ranking.heap], seen
    )
    hours = [listed for listed in state.touched.values() if listed is not None]
    parts["touched (top by hour)"] = _size([state.touched, *hours], seen)
    org_campaigns: Any = state.org_campaigns
    if hasattr(org_campaigns, "containers"):  # arrays of ids (campaignstats.orgindex)
        parts["org_campaigns"] = _size([org_campaigns, *org_campaigns.containers()], seen)
    else:  # a tree before: a dict of sets
        parts["org_campaigns"] = _size([org_campaigns, *org_campaigns.values()], seen)
    parts["seen, counted_now"] = _size([state.seen, state.counted_now], seen)
    parts["pages"] = _size([state.pages, state.page_timelines, state.pages_of], seen)
    out = {name: round(b / n, 1) for name, b in parts.items()}
    out["total"] = round(sum(parts.values()) / n, 1)
    return out


def fill(campaigns: int, spread: int, varied: bool = False) -> StatsState:
    state = StatsState()
    state.clock = lambda: NOW
    make = varied_campaign if varied else typical_campaign
    for cid in range(1, campaigns + 1):
        # The actions of the current minute arrive now (no ``at``); the others carry theirs.
        incs = [
            Increment(*item, at=NOW - 60.0 * (j % spread) if j % spread else None)
            for j, item in enumerate(make(cid))
        ]
        state.apply_many(incs)
    return state


def fill_idle(campaigns: int, spread: int, varied: bool = False) -> StatsState:
    """:func:`fill`, then the clock past ``pack_idle`` and the actor's sweep to its end."""
    state = fill(campaigns, spread, varied)
    state.pack_idle = 300.0
    sweep_idle(state)
    assert state.packed_count() == campaigns
    return state


def measure(
    campaigns: int, spread: int, top: bool, varied: bool = False, idle: bool = False
) -> dict[str, Any]:
    gc.collect()
    rss0 = rss_bytes()
    state = (fill_idle if idle else fill)(campaigns, spread, varied)
    if top:
        state.top("supporters", 10)
    gc.collect()
    rss = rss_bytes() - rss0
    del state
    gc.collect()
    tracemalloc.start()  # a second state: tracing costs memory of its own, kept out of the RSS
    traced0 = tracemalloc.get_traced_memory()[0]
    state = (fill_idle if idle else fill)(campaigns, spread, varied)
    if top:
        state.top("supporters", 10)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced0
    tracemalloc.stop()
    return {
        "campaigns": campaigns,
        "spread_minutes": spread,
        "top": top,
        "varied": varied,
        "idle": idle,
        "rss_per_campaign": round(rss / campaigns, 1),
        "traced_per_campaign": round(traced / campaigns, 1),
        "by_structure": breakdown(state, campaigns),
    }


def rows(sizes: tuple[int, ...]) -> dict[str, Any]:
    """bench.run's memory rows: ours (RSS growth) and Redis's (used_memory), same run; and the
    same for campaigns with key sets of their own (``varied.``: their own orgs and areas)."""
    out: dict[str, Any] = {}
    for prefix, varied in (("", False), ("varied.", True)):
        for size in sizes:
            ours = in_child(_workers.memory, size, varied, timeout=300)
            out[f"{prefix}mem.{size}"] = ours.get("bytes_per_campaign", ours.get("error"))
            idle = in_child(_workers.memory, size, varied, True, timeout=300)
            out[f"idle.{prefix}mem.{size}"] = idle.get("bytes_per_campaign", idle.get("error"))
    why = _redis.ensure_redis(print)
    if why is not None:
        out["redis"] = why
        return out
    with _redis.redis_server() as port:
        for prefix, varied in (("", False), ("varied.", True)):
            for size in sizes:
                theirs = in_child(_redis.memory, port, size, varied, timeout=300)
                key = f"{prefix}redis.mem.{size}"
                out[key] = theirs.get("bytes_per_campaign", theirs.get("error"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=10_000)
    parser.add_argument("--spread", type=int, default=1, help="distinct minutes of the actions")
    parser.add_argument("--top", action="store_true", help="call top once (ranking filled)")
    parser.add_argument("--redis", action="store_true", help="bench.run's memory rows and Redis")
    parser.add_argument(
        "--varied", action="store_true", help="campaigns with their own orgs and areas"
    )
    parser.add_argument(
        "--idle", action="store_true", help="then every campaign packed by the actor's sweep"
    )
    args = parser.parse_args()
    if args.redis:
        result = rows((10_000, 100_000))
        for prefix, name in (("", "typical"), ("varied.", "varied (own orgs, areas)")):
            for size in (10_000, 100_000):
                theirs = result.get(f"{prefix}redis.mem.{size}")
                shown = f"{theirs:,.0f}" if isinstance(theirs, float) else theirs
                for state, key in (("hot", f"{prefix}mem.{size}"), ("idle", f"idle.{prefix}mem")):
                    ours = result[key if state == "hot" else f"{key}.{size}"]
                    ratio = f"{ours / theirs:.1f}x" if isinstance(theirs, float) else "-"
                    print(
                        f"{name}, {size:,} campaigns, {state}: ours {ours:,.0f} B, "
                        f"Redis {shown} B, ratio {ratio}"
                    )
        append_result("memory", {**machine(), "rows": result})
        return
    if not 1 <= args.spread <= 10 or args.campaigns < 1:
        parser.error("--spread is 1 to 10 minutes, --campaigns at least 1")
    result = measure(args.campaigns, args.spread, args.top, args.varied, args.idle)
    print(
        f"{args.campaigns:,} {'varied' if args.varied else 'typical'} campaigns"
        f"{', idle (packed)' if args.idle else ''}, actions over "
        f"{args.spread} minute(s), top {'called' if args.top else 'not called'}:"
    )
    print(f"  RSS growth        {result['rss_per_campaign']:8.1f} B per campaign")
    print(f"  tracemalloc       {result['traced_per_campaign']:8.1f} B per campaign")
    for name, b in result["by_structure"].items():
        print(f"  {name:30s} {b:8.1f}")
    append_result("memory", {**machine(), **result})


if __name__ == "__main__":
    main()
