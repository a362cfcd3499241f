"""Review of the memory round (docs/design.md, "Memory"): interned keys and lazy timelines."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from campaignstats.model import Increment, StatsState
from campaignstats.timeline import DAY

NOW = 1_750_000_000.0

ROOT = Path(__file__).resolve().parent.parent


def _interpreters() -> list[str]:
    """This interpreter and any other CPython >= 3.11 (requires-python) found on the machine:
    the pure model imports with the standard library alone."""
    found = {sys.executable}
    for minor in (11, 12, 13, 14):
        found.update(p for p in (shutil.which(f"python3.{minor}"),) if p and "shims" not in p)
        found.update(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}*/bin/python")))
    return sorted(found)


# Many campaigns, each with its own action types and areas (any client may send any string up
# to max_string bytes), applied and then dropped with the whole state: nothing holds them.
_LEAK_PROBE = """
import gc, sys, tracemalloc
from campaignstats.model import Increment, StatsState
gc.collect()
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
for rnd in range(4):
    state = StatsState()
    for cid in range(1, 501):
        pad = "x" * 200
        state.apply_many([
            Increment(cid, 1, f"type-{rnd}-{cid}-{j}-{pad}", f"area-{rnd}-{cid}-{j}-{pad}", True)
            for j in range(5)
        ])
    del state
gc.collect()
print(sys.version_info[:2], tracemalloc.get_traced_memory()[0] - base)
"""


@pytest.mark.parametrize("python", _interpreters())
def test_action_types_and_areas_nothing_holds_any_more_do_not_stay_on_any_supported_python(
    python: str,
) -> None:
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if version.stdout.strip() != "True":
        pytest.skip(f"{python} does not run, or is older than requires-python")
    out = subprocess.run(
        [python, "-c", _LEAK_PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    ).stdout
    # 20,000 distinct keys of about 220 bytes went through: 5.4 MB if they stayed. What may
    # stay is the intern table's own slack (on 3.11 and 3.13, about 400 KB at most here), or
    # on 3.12 the bounded table of shared keys (1,024 keys: about 300 KB here).
    retained = int(out.split()[-1])
    assert retained < 1_500_000, out


@pytest.mark.parametrize("by", ["last_hour", "today"])
def test_top_by_the_last_hour_or_today_reads_lazy_timelines_without_filing_them(
    by: str,
) -> None:
    # 20,000 campaigns with a supporter this minute: their timelines are lazy (one minute). The
    # same campaigns with an action three days ago too: their timelines have series. top reads
    # the same candidates and the same values from both.
    lazy, filed = StatsState(), StatsState()
    lazy.clock = filed.clock = lambda: NOW
    for first in range(1, 20_001, 1000):
        ids = range(first, first + 1000)
        lazy.apply_many([Increment(c, 1, "sign", None, True) for c in ids])
        filed.apply_many([Increment(c, 1, "sign", None, True) for c in ids])
        filed.apply_many([Increment(c, 1, "share", None, False, at=NOW - 3 * DAY) for c in ids])
    assert lazy.top(by, 10) == filed.top(by, 10)
    # Reading stays lazy: no series filed by top (its cost at scale is measured in bench/, not
    # here), and a lazy timeline's unit totals are those of the series it would file.
    assert all(t.nbytes() == 72 for t in lazy.timelines.values())
    for timeline in list(lazy.timelines.values())[:50]:
        for unit in (60, 3600, 86400):
            for lo, hi in ((0, 2**62), (NOW // unit, NOW // unit + 1), (0, NOW // unit)):
                built = timeline.series_for(unit).total(int(lo), int(hi))
                assert timeline.unit_total(unit, int(lo), int(hi)) == built
        assert timeline.nbytes() == 72


def _design_memory_section() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    return text.split("\n## Memory\n", 1)[1].split("\n## ", 1)[0]


def test_the_memory_figures_of_the_design_and_the_readme_are_what_bench_memory_measures() -> None:
    # bench.memory's breakdown is sys.getsizeof of what the state holds: the same bytes on every
    # run of one tree, so the documents can state them exactly.
    from bench.memory import breakdown, fill

    typical = breakdown(fill(10_000, 1), 10_000)
    spread_state = fill(10_000, 10)
    spread_state.top("supporters", 10)
    spread = breakdown(spread_state, 10_000)
    section = _design_memory_section()
    readme = (ROOT / "README.md").read_text()
    assert f"| total | 2,726 | 1,181 | {round(typical['total']):,} |" in section
    assert (
        f"| `org_campaigns` (3 entries) | 157 | 157 | {round(typical['org_campaigns'])} |"
        in section
    )
    varied = breakdown(fill(10_000, 1, varied=True), 10_000)
    orgs = round(varied["org_campaigns"])
    assert f"{round(varied['total']):,} B now ({orgs} B), at 10,000 campaigns" in section
    series = round(spread["series and arrays"])
    assert f"{round(spread['total']):,} now (the series 1,192 and {series})" in section
    assert f"{round(spread['total']):,} B now (its series 1,192 B and " in readme
