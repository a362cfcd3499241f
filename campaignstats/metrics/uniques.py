"""Unique members: exact while small, then an Apache DataSketches CPC sketch (docs/metrics.md).

A :class:`UniqueSet` keeps its members themselves up to :data:`EXACT_LIMIT`, so small counts are
exact, then switches to a CPC sketch (``datasketches.cpc_sketch``, lg_k 14): about 0.6% relative
standard error, so within 2% past 10,000 members with more than three standard errors to spare,
for a few kilobytes whatever the number of members. Sets merge (:func:`union`): daily sets
combine into a week's or a month's figure as if the members had been counted together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import datasketches

#: members kept exactly (so small counts are exact); past it, the sketch, whose size no longer
#: grows with the members (bench/metrics.py measures both)
EXACT_LIMIT = 128
#: log2 of the CPC sketch's size parameter k
LG_K = 14


class UniqueSet:
    """A set of members answering its (estimated) size."""

    __slots__ = ("exact", "sketch")

    def __init__(self) -> None:
        self.exact: set[str] | None = set()
        self.sketch: Any = None  # datasketches.cpc_sketch once past EXACT_LIMIT

    def add(self, members: Iterable[str]) -> None:
        exact = self.exact
        if exact is not None:
            exact.update(members)
            if len(exact) > EXACT_LIMIT:
                self._to_sketch()
            return
        update = self.sketch.update
        for member in members:
            update(member)

    def _to_sketch(self) -> None:
        sketch = datasketches.cpc_sketch(LG_K)
        for member in self.exact or ():
            sketch.update(member)
        self.sketch = sketch
        self.exact = None

    def estimate(self) -> int:
        """The number of distinct members: exact up to EXACT_LIMIT, an estimate past it."""
        if self.exact is not None:
            return len(self.exact)
        return round(float(self.sketch.get_estimate()))

    def bounds(self, std_devs: int = 2) -> tuple[float, float]:
        """The estimate's confidence bounds (1, 2 or 3 standard deviations)."""
        if self.exact is not None:
            return float(len(self.exact)), float(len(self.exact))
        return self.sketch.get_lower_bound(std_devs), self.sketch.get_upper_bound(std_devs)

    @property
    def is_exact(self) -> bool:
        return self.exact is not None

    def copy(self) -> UniqueSet:
        return UniqueSet.from_state(self.to_state())

    # -- persistence: plain values, so that the model's snapshot stays one MessagePack value -----

    def to_state(self) -> list[Any]:
        """``[0, [member, ...]]`` while exact, ``[1, cpc bytes]`` past it."""
        if self.exact is not None:
            return [0, sorted(self.exact)]
        return [1, self.sketch.serialize()]

    @classmethod
    def from_state(cls, state: object) -> UniqueSet:
        """The inverse of :meth:`to_state`; ValueError when ``state`` is not one."""
        if not isinstance(state, list | tuple) or len(state) != 2:
            raise ValueError("a unique set is [kind, data]")
        kind, data = state
        out = cls()
        if kind == 0 and isinstance(data, list | tuple):
            if not all(type(m) is str for m in data) or len(data) > EXACT_LIMIT:
                raise ValueError("an exact unique set holds at most EXACT_LIMIT strings")
            out.exact = set(data)
        elif kind == 1 and type(data) is bytes:
            try:
                out.sketch = datasketches.cpc_sketch.deserialize(data)
            except Exception as exc:  # the library raises RuntimeError, ValueError...
                raise ValueError(f"not a CPC sketch: {exc}") from exc
            out.exact = None
        else:
            raise ValueError("a unique set is [0, [str, ...]] or [1, bytes]")
        return out


def union(sets: Iterable[UniqueSet]) -> UniqueSet:
    """The set of every member of ``sets`` (exact while the union is small enough)."""
    sets = list(sets)
    out = UniqueSet()
    if all(s.exact is not None for s in sets):
        for s in sets:
            out.add(s.exact or ())
        return out
    merged = datasketches.cpc_union(LG_K)
    for s in sets:
        if s.exact is not None:
            piece = datasketches.cpc_sketch(LG_K)
            for member in s.exact:
                piece.update(member)
            merged.update(piece)
        else:
            merged.update(s.sketch)
    out.exact = None
    out.sketch = merged.get_result()
    return out
