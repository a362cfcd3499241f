"""A short soak in the suite: a real server process under steady load for about 30 seconds,
Postgres restarted once under it. Memory stays flat and the counts end equal to the database.

The 30-minute version is ``python -m bench.soak`` (figures in the README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import soak

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


async def test_a_short_soak_keeps_memory_flat_and_counts_exact(tmp_path: Path) -> None:
    report = await soak(
        seconds=30, rate=800, connections=20, restarts=1, data_dir=tmp_path, progress=False
    )
    summary = report.summary()
    assert report.actions_written > 12_000
    assert report.exact, summary["mismatched_campaigns"]
    assert summary["client_drops"] == 0
    assert summary["calculations"]["completed"] >= 3
    # Flat: the second half's median RSS within 25% (plus 8 MB of allocator noise) of the first's.
    assert summary["rss_mb_second_half_median"] <= summary["rss_mb_first_half_median"] * 1.25 + 8
    assert summary["pubs_received"] > 0
