"""The output of ``bench.run``: the table and the chart (statistics: bench/_harness.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "inc/s" or unit == "cmd/s":
        return f"{value:,.0f}"
    if unit == "µs":
        return f"{value:,.1f}"
    if unit == "B":
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(metrics: dict[str, dict[str, Any]], rows: list[tuple[str, str | None]]) -> str:
    """One line per (our metric, peer metric); ratio = ours / peer (medians)."""
    head = (
        f"{'workload':52s} {'unit':6s} {'median':>11s} {'min-max':>23s} {'ok':>4s} "
        f"{'peer (Redis, same run)':40s} {'peer median':>11s} {'ours/peer':>9s}"
    )
    lines = [head, "-" * len(head)]
    for key, peer_key in rows:
        m = metrics.get(key)
        if m is None:
            continue
        s = m["summary"]
        unit = m["unit"]
        span = f"{fmt(s['min'], unit)}-{fmt(s['max'], unit)}"
        ok = "yes" if m["ok"] else "NO"
        peer = metrics.get(peer_key) if peer_key else None
        if peer is not None:
            pm = peer["summary"]["median"]
            ratio = s["median"] / pm if pm and m["ok"] and peer["ok"] else math.nan
            peer_label = peer["label"] + ("" if peer["ok"] else " (NOT OK)")
            peer_cells = f"{peer_label[:40]:40s} {fmt(pm, peer['unit']):>11s} {ratio:9.2f}"
        else:
            peer_cells = ""
        lines.append(
            f"{m['label'][:52]:52s} {unit:6s} {fmt(s['median'], unit):>11s} {span:>23s} "
            f"{ok:>4s} {peer_cells}"
        )
    return "\n".join(lines)


def chart(metrics: dict[str, dict[str, Any]], path: Path) -> str:
    """Draw the PNG; returns a message (drawn, or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (the [bench] extra): chart skipped"

    def med(key: str) -> float | None:
        m = metrics.get(key)
        return m["summary"]["median"] if m and m["ok"] else None

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    sizes = [1, 10, 100, 1000, 10000]
    pts = [(b, med(f"raw.b{b}.c1")) for b in sizes]
    pts = [(b, v) for b, v in pts if v]
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-", label="ours: pre-encoded stream, 1 conn")
    for key, x, style, label in (
        ("client.batches", 1000, "s", "ours: ClientCodec batches"),
        ("client.per_inc", 1000, "^", "ours: StatsClient.increment() (sends 1,000s)"),
        ("redis.roundtrip", 1, "x", "Redis: redis-py, 1 round trip/inc"),
        ("redis.pipeline", 1000, "D", "Redis: redis-py pipeline of 1,000"),
    ):
        v = med(key)
        if v:
            ax.plot([x], [v], style, markersize=9, label=label)
    v = med("redis.raw.c1")
    if v:
        ax.axhline(v, ls="--", color="grey", label="Redis: pre-encoded RESP stream, 1 conn")
    v = med("ceiling.decode_apply")
    if v:
        ax.axhline(v, ls=":", color="black", label="in-process ceiling (decode+apply)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("increments per message (batch size)")
    ax.set_ylabel("increments/s")
    ax.set_title("Ingest against batch size")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    for prefix, conns, label in (
        ("raw.b1000", (1, 4, 16), "ours: incs of 1,000"),
        ("raw.b1", (1, 16), "ours: single inc"),
        ("redis.raw", (1, 16), "Redis: RESP HINCRBY stream"),
    ):
        pts = [(c, med(f"{prefix}.c{c}")) for c in conns]
        pts = [(c, v) for c, v in pts if v]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("connections")
    ax.set_ylabel("increments/s")
    ax.set_title("Raw capacity against connections")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[2]
    groups = [
        ("lat.idle", "ours idle"),
        ("lat.load", "ours under load"),
        ("redis.lat.idle", "Redis idle"),
        ("redis.lat.load", "Redis under load"),
    ]
    pcts = ("p50", "p99", "p99.9")
    width = 0.2
    for i, (key, label) in enumerate(groups):
        vals = [med(f"{key}.{p}") or 0 for p in pcts]
        ax.bar([j + i * width for j in range(3)], vals, width, label=label)
    ax.set_xticks([j + 1.5 * width for j in range(3)], pcts)
    ax.set_yscale("log")
    ax.set_ylabel("µs")
    ax.axhline(60, color="green", ls=":", lw=1)
    ax.axhline(150, color="orange", ls=":", lw=1)
    ax.axhline(1000, color="red", ls=":", lw=1)
    ax.set_title("Query latency (stats / HGETALL), sequential")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart written to {path}"
