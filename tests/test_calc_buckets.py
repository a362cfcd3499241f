"""The calculation's bucket of a time (campaignstats/db/queries.py, ``_BUCKET``) is date_bin
arithmetic instead of date_trunc: it must give date_trunc's start for every timestamp Postgres
holds, on bucket boundaries, before 2000 (Postgres 16's date_bin puts a time before its origin
that lies on a boundary one bin too early), before year 1, at the lowest and highest timestamps
and at the infinities."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from campaignstats.db.queries import _BUCKET

#: date_trunc's buckets, as the calculation read them before (docs/design.md, "Time")
TRUNC = """
CASE WHEN {t} >= $2::timestamp THEN date_trunc('minute', {t})
     WHEN {t} >= $3::timestamp THEN date_trunc('hour', {t})
     ELSE date_trunc('day', {t}) END
"""

DIFFERENT = f"""
SELECT t::text, ({_BUCKET.format(t="t")})::text, ({TRUNC.format(t="t")})::text
FROM unnest($1::text[]) AS x(s), LATERAL (SELECT s::timestamp AS t) y
WHERE ({_BUCKET.format(t="t")}) IS DISTINCT FROM ({TRUNC.format(t="t")})
"""

#: (minute cutoff, hour cutoff): aligned on an hour and a day, as the calculation's are
CUTOFFS = [
    ("2026-12-02 01:00:00", "2026-09-03 00:00:00"),
    ("2000-01-01 00:00:00", "1999-12-31 00:00:00"),
    ("1990-06-01 13:00:00", "1970-01-01 00:00:00"),
]

TIMES = [
    "4714-11-24 00:00:00 BC",  # the lowest timestamp
    "4714-11-24 23:59:59.999999 BC",
    "0001-01-01 00:00:00 BC",
    "0001-12-31 23:59:59.999999 BC",
    "0001-01-01 00:00:00",
    "0001-01-01 00:00:00.000001",
    "1899-12-31 00:00:00",
    "1969-12-31 23:59:59.999999",
    "1970-01-01 00:00:00",
    "1999-12-30 00:00:00",
    "1999-12-31 00:00:00",  # before 2000, on a day boundary
    "1999-12-31 00:00:00.000001",
    "1999-12-31 23:59:59.999999",
    "2000-01-01 00:00:00",
    "2000-01-01 00:59:59.999999",
    "2026-09-02 23:59:59.999999",
    "2026-09-03 00:00:00",  # a cutoff itself
    "2026-09-03 00:00:00.000001",
    "2026-12-02 00:59:59.999999",
    "2026-12-02 01:00:00",
    "2026-12-02 01:00:59.999999",
    "2026-12-02 01:01:00",
    "2026-12-31 23:59:59",
    "9999-12-31 23:59:59.999999",
    "294276-12-31 23:59:59.999999",  # the highest timestamp
    "294276-12-31 00:00:00",
    "infinity",
    "-infinity",
]


async def test_the_bucket_of_a_time_is_the_start_date_trunc_gives_at_every_edge(
    conn: asyncpg.Connection,
) -> None:
    # every minute of a day before 2000, and every hour of a year around both: all boundaries
    every_minute = await conn.fetch(
        "SELECT t::text FROM generate_series('1999-12-30'::timestamp, '2000-01-01 12:00', "
        "'1 minute'::interval) t"
    )
    every_hour = await conn.fetch(
        "SELECT (t + interval '17 seconds')::text FROM generate_series("
        "'1999-06-01'::timestamp, '2000-06-01', '1 hour'::interval) t"
    )
    times = TIMES + [r[0] for r in every_minute] + [r[0] for r in every_hour]
    for minute_cutoff, hour_cutoff in CUTOFFS:
        cutoffs = datetime.fromisoformat(minute_cutoff), datetime.fromisoformat(hour_cutoff)
        differ = await conn.fetch(DIFFERENT, times, *cutoffs)
        assert differ == [], (minute_cutoff, hour_cutoff, differ[:5])
