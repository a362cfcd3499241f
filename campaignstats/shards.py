"""Which shard owns a campaign: rendezvous (highest-random-weight) hashing (docs/scale.md).

One pure function, :func:`shard_of`, used by everything that must agree on it: the server
(``serve --shard K/N`` refuses what it does not own), the calculation and the follower (they
keep only the shard's campaigns) and the routing clients (they send each increment and query
to its owner). Clients in other languages reproduce it from this definition:

    weight(k, campaign) = the first 8 bytes, as a big-endian unsigned integer, of
                          BLAKE2b-512( uint64_be(k) || uint64_be(campaign) )
    owner(campaign, N)  = the k in 0..N-1 with the highest weight (the lowest k on a tie)

Why rendezvous rather than ``campaign % N``: when a shard is added (N to N+1), a campaign moves
only if the new shard's weight beats the old owner's, which happens for about 1/(N+1) of them;
with a modulo almost every campaign would move, and each move is a campaign that the new
layout's servers must load from the database. BLAKE2b-512 is in every standard library or its
usual crypto package (Python's hashlib, Go's x/crypto/blake2b, Node's ``blake2b512``, libsodium),
and truncating it to 64 bits needs no choice of parameters.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from campaignstats.errors import UsageError, WrongShard
from campaignstats.model import CalculationResult

_PACK = struct.Struct(">QQ").pack
#: how many owners a :class:`Shard` remembers (a campaign's owner costs N hashes to find)
_CACHE_SIZE = 1 << 16


def weight(shard: int, campaign_id: int) -> int:
    """The rendezvous weight of ``shard`` for ``campaign_id`` (a 64-bit unsigned integer)."""
    return int.from_bytes(hashlib.blake2b(_PACK(shard, campaign_id)).digest()[:8], "big")


def shard_of(campaign_id: int, shards: int) -> int:
    """The shard (0 to ``shards`` - 1) that owns ``campaign_id``."""
    if shards < 1:
        raise UsageError(f"the number of shards must be at least 1, not {shards!r}")
    if shards == 1:
        return 0
    best, owner = -1, 0
    for k in range(shards):
        w = weight(k, campaign_id)
        if w > best:
            best, owner = w, k
    return owner


_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Shard:
    """This server's part: shard ``index`` of ``count`` (``serve --shard K/N``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with 0 <= K < N; raises :class:`UsageError` saying what is wrong."""
        match = _SPEC.match(text)
        if match is None:
            raise UsageError(f"a shard is K/N (e.g. 0/2), not {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise UsageError(f"shard {text!r}: N must be at least 1")
        if not 0 <= index < count:
            raise UsageError(f"shard {text!r}: K must be between 0 and {count - 1}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def to_wire(self) -> list[int]:
        return [self.index, self.count]


class ShardFilter:
    """A :class:`Shard`'s ownership test, with the owners it has computed remembered."""

    __slots__ = ("_cache", "shard")

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._cache: dict[int, bool] = {}

    def owns(self, campaign_id: int) -> bool:
        mine = self._cache.get(campaign_id)
        if mine is None:
            mine = shard_of(campaign_id, self.shard.count) == self.shard.index
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()  # a bound, not an LRU: recomputing costs N hashes
            self._cache[campaign_id] = mine
        return mine

    def restrict(self, result: CalculationResult) -> CalculationResult:
        """A calculation's result without the campaigns of other shards (a source given the
        shard's filter, ``PostgresSource.owns``, never reads them in the first place)."""
        owns = self.owns
        if all(owns(cid) for cid in result.campaigns):
            return result
        return replace(
            result,
            campaigns={c: s for c, s in result.campaigns.items() if owns(c)},
            timelines={c: t for c, t in result.timelines.items() if owns(c)},
        )

    def restrict_snapshot(
        self, campaigns: dict[int, Any], goals: dict[str, Any] | None
    ) -> tuple[dict[int, Any], dict[str, Any] | None]:
        """A snapshot file's campaigns (their counts: the file holds no timelines or pages) and
        goals part without the campaigns of other shards: the file of an unsharded server, or of
        another layout, holds them (docs/scale.md, "Changing N")."""
        owns = self.owns
        kept = {cid: stats for cid, stats in campaigns.items() if owns(cid)}
        if goals is not None:
            goals = {
                part: [entry for entry in entries if _owned_entry(owns, entry)]
                if isinstance(entries, list)
                else entries
                for part, entries in goals.items()
            }
        return kept, goals

    def refusal(self, campaign_id: int) -> str:
        owner = shard_of(campaign_id, self.shard.count)
        return (
            f"campaign {campaign_id} belongs to shard {owner}/{self.shard.count}, "
            f"not to this server (shard {self.shard})"
        )

    def owned(self, campaign_ids: Iterable[int]) -> list[int]:
        return [cid for cid in campaign_ids if self.owns(cid)]

    def check_request(self, request: Any) -> None:
        """Raise :class:`WrongShard` when a call names a campaign this shard does not own
        (``campaign_id``, or any of ``campaign_ids``); nothing is changed then."""
        cid = getattr(request, "campaign_id", None)
        if type(cid) is int and not self.owns(cid):
            raise WrongShard(self.refusal(cid))
        ids = getattr(request, "campaign_ids", None)
        if ids is not None:
            for cid in ids:
                if not self.owns(cid):
                    raise WrongShard(self.refusal(cid))

    def split(self, items: Sequence[Any]) -> tuple[Sequence[Any], Refused | None]:
        """The items of campaigns this shard owns, and the refusal of the others (None when
        there are none: then ``items`` comes back as it is, with no copy)."""
        owns = self.owns
        if all(owns(item.campaign_id) for item in items):
            return items, None
        kept: list[Any] = []
        positions: list[int] = []
        refused: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            if owns(item.campaign_id):
                kept.append(item)
                positions.append(i)
            else:
                refused.append((i, self.refusal(item.campaign_id)))
        return kept, Refused(positions, refused)


def _owned_entry(owns: Any, entry: Any) -> bool:
    """Whether a goals part's ``[campaign_id, ...]`` entry is of this shard (an entry of
    another form is kept: the goals' loader checks it)."""
    if isinstance(entry, list) and entry and type(entry[0]) is int:
        return bool(owns(entry[0]))
    return True


class Refused(NamedTuple):
    """Items of a batch refused for their shard, and where the kept ones were in it."""

    positions: list[int]  # the original index of each kept item
    refused: list[tuple[int, str]]  # (original index, reason)

    def report(self, rejected: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Every refused item of the batch, in its numbering: the shard's refusals and the
        state's (``rejected``, numbered among the kept items)."""
        positions = self.positions
        return sorted([*self.refused, *((positions[i], why) for i, why in rejected)])


def group_by_shard(campaign_ids: Iterable[int], shards: int) -> dict[int, list[int]]:
    """Campaign ids by their owner (the routing clients split ``stats_many`` with it)."""
    groups: dict[int, list[int]] = {}
    for cid in campaign_ids:
        groups.setdefault(shard_of(cid, shards), []).append(cid)
    return groups


__all__ = [
    "Refused",
    "Shard",
    "ShardFilter",
    "WrongShard",
    "group_by_shard",
    "shard_of",
    "weight",
]
