"""The bench's workload: increments over 1,000 campaigns, generated once with a fixed seed.

Campaign ids 1..1000 with Zipf-skewed traffic (weight 1/k**1.1), 5 action types, 30 areas
(20% of increments have none), 50 orgs, 60% new supporters. Items are the 7-field wire items
that :class:`~campaignstats.client.StatsClient` sends:
``(campaign_id, org_id, action_type, area, new_supporter, count, action_id)``.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from campaignstats.model import CampaignStats, Increment, StatsState
from campaignstats.protocol import ClientCodec

CAMPAIGNS = 1_000
ZIPF_S = 1.1
ACTION_TYPES = ("register", "share", "mail_target", "donate", "petition")
ACTION_WEIGHTS = (50, 20, 15, 10, 5)
AREAS = (
    "DE", "FR", "IT", "ES", "PL", "NL", "BE", "AT", "PT", "SE", "CZ", "GR", "HU", "RO", "DK",
    "FI", "IE", "SK", "BG", "HR", "LT", "LV", "SI", "EE", "LU", "MT", "CY", "GB", "CH", "NO",
)  # fmt: skip
NO_AREA = 0.2
ORGS = 50
NEW_SUPPORTER = 0.6

Item = tuple[int, int, str, str | None, bool, int, None]
#: comparable totals of one campaign: (supporters, action, area, org)
Totals = dict[int, tuple[int, dict[str, int], dict[str, int], dict[int, int]]]


def generate(n: int, seed: int = 42) -> list[Item]:
    rng = random.Random(seed)
    cum_campaigns = list(itertools.accumulate(1 / k**ZIPF_S for k in range(1, CAMPAIGNS + 1)))
    cids = rng.choices(range(1, CAMPAIGNS + 1), cum_weights=cum_campaigns, k=n)
    types = rng.choices(ACTION_TYPES, weights=ACTION_WEIGHTS, k=n)
    rand = rng.random
    randrange = rng.randrange
    out: list[Item] = []
    for cid, action_type in zip(cids, types, strict=True):
        area = None if rand() < NO_AREA else AREAS[randrange(30)]
        out.append((cid, 1 + randrange(ORGS), action_type, area, rand() < NEW_SUPPORTER, 1, None))
    return out


def encode_incs(items: list[Item], batch: int) -> bytes:
    """``incs`` messages of ``batch`` items (``inc`` messages when ``batch`` is 1), concatenated."""
    codec = ClientCodec()
    if batch == 1:
        return b"".join(codec.inc(item) for item in items)
    return b"".join(codec.incs(items[i : i + batch]) for i in range(0, len(items), batch))


def split(stream_items: list[Item], parts: int) -> list[list[Item]]:
    return [stream_items[i::parts] for i in range(parts)]


def expected(items: list[Item]) -> Totals:
    state = StatsState()
    rejected = state.apply_many([Increment(*item) for item in items])
    assert not rejected
    return {cid: _totals(stats) for cid, stats in state.campaigns.items()}


def _totals(stats: CampaignStats) -> tuple[int, dict[str, int], dict[str, int], dict[int, int]]:
    return (stats.supporters, dict(stats.action), dict(stats.area), dict(stats.org))


def wire_totals(wire: dict[int, dict[str, Any]]) -> Totals:
    return {
        int(cid): (
            s["supporters"],
            dict(s["action"]),
            dict(s["area"]),
            {int(k): v for k, v in s["org"].items()},
        )
        for cid, s in wire.items()
    }


def _sub(a: dict[Any, int], b: dict[Any, int]) -> dict[Any, int]:
    out = {k: v - b.get(k, 0) for k, v in a.items()}
    out.update({k: -v for k, v in b.items() if k not in a})
    return {k: v for k, v in out.items() if v}


def delta(after: Totals, before: Totals) -> Totals:
    empty: tuple[int, dict[str, int], dict[str, int], dict[int, int]] = (0, {}, {}, {})
    out: Totals = {}
    for cid in set(after) | set(before):
        a, b = after.get(cid, empty), before.get(cid, empty)
        d = (a[0] - b[0], _sub(a[1], b[1]), _sub(a[2], b[2]), _sub(a[3], b[3]))
        if d[0] or d[1] or d[2] or d[3]:
            out[cid] = d
    return out


def same(got: Totals, want: Totals) -> bool:
    """Equal totals, ignoring campaigns that are all zero."""

    def nonzero(t: Totals) -> Totals:
        return {c: v for c, v in t.items() if v[0] or v[1] or v[2] or v[3]}

    return nonzero(got) == nonzero(want)


def count_applied(totals: Totals) -> int:
    return sum(sum(t[1].values()) for t in totals.values())
