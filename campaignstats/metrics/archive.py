"""The metrics archive: files a data team can load, one per period (docs/metrics.md, "Archive").

After statshub's export to BigQuery every 10 minutes. Each file holds, for one period:

* the value of every counter, unique set (its estimate) and last-seen stamp at the time of the
  export, in every scope (``kind`` ``counter``, ``unique``, ``last_seen``);
* the gauge buckets that were completed in the period (``gauge``, ``bucket_start``), and the
  daily unique sets of the UTC days completed in it (``unique_day``).

Parquet through pyarrow when it is installed (the ``archive`` extra), CSV otherwise; written
atomically (temporary file, fsync, rename), named ``metrics-<period start, UTC>.<ext>``, never
overwritten. :func:`export` writes one period; :class:`Archiver` is the small driver that knows
which periods are due. Scheduling it in the server comes with the wiring (docs/metrics.md).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Literal

from campaignstats.files import atomic_write
from campaignstats.metrics.model import BUCKET, DAY, MetricsState

Format = Literal["auto", "parquet", "csv"]
#: the columns of every file, in order
COLUMNS = (
    "period_start",  # epoch seconds, int
    "campaign_id",  # int
    "dim",  # str or null (the campaign's total)
    "key",  # str or null (the dimension's total)
    "kind",  # counter | unique | last_seen | gauge | unique_day
    "name",  # the metric's name
    "bucket_start",  # gauge bucket or UTC day start (epoch seconds), else null
    "count",  # counter value, unique estimate; else null
    "value",  # gauge value, last-seen stamp; else null
)
Row = tuple[int, int, str | None, str | None, str, str, int | None, int | None, float | None]


def has_parquet() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def rows(state: MetricsState, period_start: int, period_end: int) -> list[Row]:
    """The rows of one period ``[period_start, period_end)`` (see the module's docstring)."""
    out: list[Row] = []
    for cid, dim, key, values in state.iter_values():
        head = (period_start, cid, dim, key)
        for name, n in values.counters.items():
            out.append((*head, "counter", name, None, n, None))
        for name, unique in values.uniques.items():
            out.append((*head, "unique", name, None, unique.all.estimate(), None))
            for day, members in unique.days.items():
                if period_start < (day + 1) * DAY <= period_end:
                    out.append((*head, "unique_day", name, day * DAY, members.estimate(), None))
        for name, at in values.last_seen.items():
            out.append((*head, "last_seen", name, None, None, at))
        for name, buckets in values.gauges.items():
            for start, value in sorted(buckets.items()):
                if period_start < start + BUCKET <= period_end:
                    out.append((*head, "gauge", name, start, None, float(value)))
    return out


def file_name(period_start: int, fmt: Literal["parquet", "csv"]) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(period_start))
    return f"metrics-{stamp}.{fmt}"


def export(
    state: MetricsState,
    directory: Path,
    period_start: int,
    period_end: int,
    fmt: Format = "auto",
) -> Path | None:
    """Write the period's file; returns its path, or None when it exists already."""
    chosen: Literal["parquet", "csv"] = (
        ("parquet" if has_parquet() else "csv") if fmt == "auto" else fmt
    )
    path = directory / file_name(period_start, chosen)
    if path.exists():
        return None
    data = rows(state, period_start, period_end)
    atomic_write(path, _parquet(data) if chosen == "parquet" else _csv(data))
    return path


def _csv(data: list[Row]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(["" if v is None else v for v in row] for row in data)
    return text.getvalue().encode()


def _parquet(data: list[Row]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("period_start", pa.int64()),
            ("campaign_id", pa.int64()),
            ("dim", pa.string()),
            ("key", pa.string()),
            ("kind", pa.string()),
            ("name", pa.string()),
            ("bucket_start", pa.int64()),
            ("count", pa.int64()),
            ("value", pa.float64()),
        ]
    )
    columns: list[list[Any]] = [list(c) for c in zip(*data, strict=True)] if data else []
    table = pa.Table.from_arrays(
        [pa.array(col, type=schema.field(i).type) for i, col in enumerate(columns)]
        if columns
        else [pa.array([], type=f.type) for f in schema],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


class Archiver:
    """Which periods are due, and their export: call :meth:`run` now and then (every minute).

    Periods are aligned on ``period`` seconds (UTC). The first run exports the last complete
    period; later runs every complete period since the last one exported, so a pause (a
    restart, a slow disk) is caught up (the counter values are those of the run's time).
    """

    def __init__(self, directory: Path, period: int = 600, fmt: Format = "auto") -> None:
        if period <= 0:
            raise ValueError("period must be a positive number of seconds")
        self.directory = directory
        self.period = period
        self.fmt: Format = fmt
        self.exported_until: int | None = None
        self.files = 0

    def due(self, now: float) -> bool:
        end = int(now // self.period) * self.period
        return self.exported_until is None or end > self.exported_until

    def run(self, state: MetricsState, now: float) -> list[Path]:
        end = int(now // self.period) * self.period
        start = end - self.period if self.exported_until is None else self.exported_until
        written = []
        for period_start in range(start, end, self.period):
            path = export(state, self.directory, period_start, period_start + self.period, self.fmt)
            if path is not None:
                written.append(path)
        self.exported_until = max(end, self.exported_until or end)
        self.files += len(written)
        return written
