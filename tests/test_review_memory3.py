"""Review of the memory round 4 (docs/design.md, "Memory", round 4: orgs of one campaign in
buckets, idle lazy timelines folded into the packed form): what README says of memory."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _round_4_idle_figures() -> dict[str, tuple[str, str]]:
    """Per kind of campaign, ``(bytes, ratio)`` of the idle campaigns at 10,000 and 100,000
    as docs/design.md's round-4 table states them: ``("327 / 413", "1.2x / 1.6x")``."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("Round 4 (2026-12-02, issue 16)", 1)[1]
    rows = re.findall(
        r"^\| (typical|varied), (10,000|100,000) \| [\d,]+ \| ([\d,]+) \| [\d,]+ \| "
        r"([\d.]+x) \(",
        section,
        re.M,
    )
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for kind, size, idle, ratio in rows[:4]:
        found.setdefault(kind, {})[size] = (idle, ratio)
    assert set(found) == {"typical", "varied"}, rows
    return {
        kind: (
            f"{sizes['10,000'][0]} / {sizes['100,000'][0]}",
            f"{sizes['10,000'][1]} / {sizes['100,000'][1]}",
        )
        for kind, sizes in found.items()
    }


def test_the_readme_states_the_idle_memory_figures_of_the_latest_round() -> None:
    # README's targets table and its memory section stated round 3's figures (idle varied
    # campaigns 683 / 738 B, 2.3x / 2.5x Redis: "not met") after round 4 measured 395 / 436 B
    # (1.4x / 1.5x), and listed the folded timeline as a step "not built".
    figures = _round_4_idle_figures()
    readme = (ROOT / "README.md").read_text()
    target = next(line for line in readme.splitlines() if "at most 2x Redis" in line)
    memory = readme.split("**Memory per campaign**", 1)[1].split("\n\n**", 1)[0]
    for kind, (idle, ratio) in figures.items():
        assert f"{idle} B" in target, (kind, idle, target)
        assert ratio in target, (kind, ratio, target)
        row = next(line for line in memory.splitlines() if line.startswith(f"| {kind}, idle"))
        assert f"{idle} B" in row, (kind, row)
        assert ratio in row, (kind, row)
    assert "an idle timeline folded into the packed form)" not in memory  # built: round 4
