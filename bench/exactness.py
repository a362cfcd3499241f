"""How exact is the merge when changes carry less than a txid? A measurement, not a test.

    python -m bench.exactness [--runs 2000] [--actions 8] [--seed 1]

Plays a Proca deployment at random against the real model (``campaignstats.model.StatsState``)
and a model of Postgres visibility, as ``tests/test_merge_visibility.py`` does: actions accepted
(increments), some rejected later (decrements) and accepted again, transactions interleaved,
announcements after commit with any delay, calculations journaling, snapshotting and merging
at any point. After everything is committed and announced, and before any further calculation,
memory is compared with the database. Each mode announces changes with different fields:

* ``txid``: the transaction id (exact by construction: the test proves it at every step);
* ``action_id``: only the action id, inside the calculation's window;
* ``action_id, below window``: only the action id, with a window smaller than the ids in play;
* ``action_id, any order``: only the action id, an action's changes announced in any order (a
  rejection before the acceptance it takes back);
* ``at``: only the time of the action (when it was first committed; a rejection and a
  re-acceptance carry it too, as docs/protocol.md says; clock of the backend = clock of the
  database here);
* ``none``: no id at all.

Prints, per mode, the share of runs that end inexact and the error in supporters (memory minus
the database: positive counts too many). Writes bench/results/exactness.json.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Increment,
    StatsState,
    TxSnapshot,
)

RESULTS = Path(__file__).parent / "results"


@dataclass
class Change:
    action: int
    decrement: bool
    txid: int | None = None
    committed_at: float | None = None  # the simulation's clock
    announced: bool = False


@dataclass(frozen=True)
class Mode:
    name: str
    txid: bool = False
    action_id: bool = False
    at: bool = False
    window: int | None = None  # ids known one by one below the highest (None: all)
    any_order: bool = False


MODES = [
    Mode("txid", txid=True, action_id=True),
    Mode("action_id", action_id=True),
    Mode("action_id, below window", action_id=True, window=2),
    Mode("action_id, any order", action_id=True, any_order=True),
    Mode("at", at=True),
    Mode("none"),
]


def play(rng: random.Random, mode: Mode, actions: int, p_reject: float) -> int:
    """One random history; returns memory's supporters minus the database's."""
    clock = 0.0
    next_txid = 3
    running: set[int] = set()
    changes = [Change(a, False) for a in range(1, actions + 1)]
    state = StatsState()
    calc: tuple[str, CalculationResult | None] = ("idle", None)

    def counted(include: list[Change]) -> set[int]:
        last: dict[int, bool] = {}
        for c in include:  # an action's changes commit in list order
            last[c.action] = not c.decrement
        return {action for action, yes in last.items() if yes}

    #: when each action happened (its first commit): the ``at`` of all its changes, as
    #: docs/protocol.md says (a decrement carries the same fields as its increment)
    made: dict[int, float] = {}

    def announce(c: Change) -> None:
        c.announced = True
        inc = Increment(
            1,
            1,
            "sign",
            None,
            True,
            action_id=c.action if mode.action_id else None,
            txid=c.txid if mode.txid else None,
            at=made[c.action] if mode.at else None,
        )
        state.apply(inc, decrement=c.decrement)

    for _ in range(6 * actions):
        clock += 10.0  # every step is 10 s: clocks are far apart, as the AT_MARGIN assumes
        moves: list[tuple[str, Change | None]] = []
        last: dict[int, Change] = {}
        for c in changes:
            previous = last.get(c.action)
            last[c.action] = c
            if c.txid is None and (previous is None or previous.committed_at is not None):
                moves.append(("begin", c))
            elif c.txid is not None and c.committed_at is None:
                moves.append(("commit", c))
            elif (
                c.committed_at is not None
                and not c.announced
                and (previous is None or previous.announced or mode.any_order)
            ):
                moves.append(("announce", c))
        for c in last.values():
            flips = sum(1 for x in changes if x.action == c.action)
            if c.committed_at is not None and flips < 4 and rng.random() < p_reject:
                moves.append(("flip", c))  # reject it, or accept it again
        moves.append(("calc", None))
        move, picked = rng.choice(moves)
        c = picked if picked is not None else changes[0]
        if move == "begin":
            c.txid = next_txid
            next_txid += 1
            running.add(c.txid)
        elif move == "commit" and c.txid is not None:
            running.discard(c.txid)
            c.committed_at = clock
            made.setdefault(c.action, clock)
        elif move == "announce":
            announce(c)
        elif move == "flip":
            changes.append(Change(c.action, not c.decrement))
        elif calc[0] == "idle":
            state.start_journal()
            calc = ("journal", None)
        elif calc[0] == "journal":
            xip = frozenset(running)
            snapshot = TxSnapshot(min(xip, default=next_txid), next_txid, xip)
            seen = counted([x for x in changes if x.committed_at is not None])
            low = 0 if mode.window is None else max(0, actions - mode.window)
            uncounted = frozenset(range(low + 1, actions + 1)) - seen
            n = len(seen)
            stats = CampaignStats(n, {"sign": n} if n else {}, {}, {1: n} if n else {})
            result = CalculationResult(
                "all",
                {1: stats},
                actions,
                uncounted_ids=uncounted,
                window_low=low,
                snapshot=snapshot,
                taken_at=clock,
            )
            calc = ("taken", result)
        else:
            assert calc[1] is not None
            state.merge(calc[1])
            state.stop_journal()
            calc = ("idle", None)
    for c in changes:
        if c.txid is None:
            c.txid = next_txid
            next_txid += 1
        if c.committed_at is None:
            clock += 10.0
            c.committed_at = clock
            made.setdefault(c.action, clock)
    late = [c for c in changes if not c.announced]  # in order: each action's changes in order
    if mode.any_order:
        rng.shuffle(late)
    for c in late:
        announce(c)
    truth = len(counted(changes))
    return state.campaigns.get(1, CampaignStats()).supporters - truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2_000)
    parser.add_argument("--actions", type=int, default=8)
    parser.add_argument("--reject", type=float, default=0.1, help="chance of a rejection move")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = []
    print(f"{'mode':<26} {'inexact runs':>12} {'mean |error|':>12} {'max error':>10}")
    for mode in MODES:
        rng = random.Random(args.seed)
        errors = [play(rng, mode, args.actions, args.reject) for _ in range(args.runs)]
        inexact = sum(1 for e in errors if e)
        mean = sum(abs(e) for e in errors) / len(errors)
        worst = max(errors, key=abs)
        report.append(
            {"mode": mode.name, "runs": len(errors), "inexact": inexact, "mean_abs": mean,
             "worst": worst}
        )  # fmt: skip
        print(f"{mode.name:<26} {inexact / len(errors):>11.1%} {mean:>12.3f} {worst:>+10d}")
    RESULTS.mkdir(exist_ok=True)
    out = {"runs": args.runs, "actions": args.actions, "seed": args.seed, "modes": report}
    (RESULTS / "exactness.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
