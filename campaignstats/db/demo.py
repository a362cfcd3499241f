"""``demo``: fill the Proca-compatible schema with realistic, skewed, reproducible data, by COPY.

The shape follows what a petition platform sees: a few campaigns hold most actions (Zipf weights),
each campaign runs several partner orgs' action pages, people sign twice (repeated fingerprints,
``dupe_rank`` > 0 or not yet ranked), every processing status appears, some actions are tests,
some supporters have no area, some pages carry offline ``extra_supporters`` (one org per demo has
only those, and no supporter at all), and one campaign has no action.

The same ``seed`` on the same starting database gives the same rows. New rows take ids after the
highest ones present, so ``demo`` can run on a database that already holds data.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import asyncpg

log = structlog.get_logger(__name__)

AREAS = [
    "DE", "FR", "IT", "ES", "PL", "NL", "BE", "AT", "SE", "PT", "CZ", "GR", "HU", "DK", "FI",
    "IE", "RO", "BG", "SK", "HR", "SI", "LT", "LV", "EE", "LU", "MT", "CY", "GB", "CH", "NO",
]  # fmt: skip
ACTION_TYPES_NEW = ["register", "petition"]
ACTION_TYPES_AGAIN = ["share", "mail2target", "donate", "petition"]
#: (code, weight) of supporters.processing_status: 0 new, 1 confirming, 2 rejected, 3 accepted
SUPPORTER_STATUS = ((3, 80), (0, 8), (1, 5), (2, 7))
#: actions.processing_status: 0 new, 1 confirming, 2 rejected, 3 accepted, 4 delivered, 5 repeat
ACTION_STATUS = ((3, 58), (4, 25), (0, 5), (1, 3), (2, 4), (5, 5))
CAMPAIGN_STATUS = ((1, 70), (2, 20), (0, 5), (3, 5))
CHUNK = 50_000
BASE_TIME = datetime(2025, 1, 1)


_Chunk = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


@dataclass(frozen=True, slots=True)
class DemoSummary:
    campaigns: int
    orgs: int
    action_pages: int
    supporters: int
    actions: int
    seconds: float

    @property
    def actions_per_second(self) -> float:
        return self.actions / self.seconds if self.seconds else 0.0


def _weighted(rng: random.Random, table: tuple[tuple[int, int], ...], k: int) -> list[int]:
    values = [v for v, _ in table]
    weights = [w for _, w in table]
    return rng.choices(values, weights, k=k)


class _Generator:
    """Produces the rows; all randomness comes from one ``random.Random(seed)``."""

    def __init__(self, actions: int, seed: int, first_ids: dict[str, int]) -> None:
        self.rng = rng = random.Random(seed)
        self.n_actions = actions
        self.ids = dict(first_ids)
        self.key = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()
        n_campaigns = max(3, min(300, actions // 10_000 + 3))
        n_orgs = max(4, n_campaigns // 2 + 4)
        self.orgs = [
            (self._next("orgs"), f"Demo org {i + 1}", BASE_TIME, BASE_TIME) for i in range(n_orgs)
        ]
        # The last org has only offline supporters: extra_supporters on its pages, no actions.
        offline_org = self.orgs[-1][0]
        statuses = _weighted(rng, CAMPAIGN_STATUS, n_campaigns)
        statuses[0] = statuses[1] = 1  # the two busiest campaigns are live
        self.campaigns = [
            (
                self._next("campaigns"),
                f"Demo campaign {i + 1}",
                self.orgs[i % (n_orgs - 1)][0],
                st,
                BASE_TIME,
                BASE_TIME,
            )
            for i, st in enumerate(statuses)
        ]
        # Zipf-like weights; the last campaign gets none: a campaign without actions.
        self.campaign_weights = [1 / (i + 1) ** 1.1 for i in range(n_campaigns - 1)] + [0.0]
        self.pages: list[tuple[Any, ...]] = []
        self.pages_of: list[list[tuple[int, int]]] = []  # per campaign: (page id, org id)
        for ci, (cid, *_) in enumerate(self.campaigns):
            active: list[tuple[int, int]] = []
            for p in range(rng.randint(2, 6)):
                org_id = self.orgs[rng.randrange(n_orgs - 1)][0]
                extra = rng.randint(1, 500) if rng.random() < 0.2 else 0
                page_id = self._next("action_pages")
                self.pages.append(
                    (page_id, f"demo/{cid}/{p}", cid, org_id, extra, BASE_TIME, BASE_TIME)
                )
                active.append((page_id, org_id))
            if ci % 4 == 0:
                page_id = self._next("action_pages")
                extra = rng.randint(10, 1_000)
                self.pages.append(
                    (page_id, f"demo/{cid}/offline", cid, offline_org, extra, BASE_TIME, BASE_TIME)
                )
            self.pages_of.append(active)
        self.supporters_of: list[list[int]] = [[] for _ in self.campaigns]
        self.fingerprints_of: list[list[bytes]] = [[] for _ in self.campaigns]
        self.fingerprint_uses: dict[bytes, int] = {}
        self.n_supporters = 0

    def _next(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def _fingerprint(self, person: int) -> bytes:
        return hashlib.blake2b(person.to_bytes(8, "little"), key=self.key, digest_size=16).digest()

    def chunks(self) -> Iterator[_Chunk]:
        """Yield (supporters, actions) rows, CHUNK actions at a time, supporters first."""
        rng = self.rng
        rand = rng.random
        randrange = rng.randrange
        for start in range(0, self.n_actions, CHUNK):
            k = min(CHUNK, self.n_actions - start)
            campaign_idx = rng.choices(range(len(self.campaigns)), self.campaign_weights, k=k)
            s_status = _weighted(rng, SUPPORTER_STATUS, k)
            a_status = _weighted(rng, ACTION_STATUS, k)
            supporters: list[tuple[Any, ...]] = []
            actions: list[tuple[Any, ...]] = []
            for j in range(k):
                ci = campaign_idx[j]
                cid = self.campaigns[ci][0]
                page_id, _ = self.pages_of[ci][randrange(len(self.pages_of[ci]))]
                known = self.supporters_of[ci]
                at = BASE_TIME + timedelta(seconds=start + j)
                if known and rand() >= 0.6:
                    supporter_id = known[randrange(len(known))]
                    action_type = ACTION_TYPES_AGAIN[randrange(4)]
                else:
                    supporter_id = self._next("supporters")
                    prints = self.fingerprints_of[ci]
                    if prints and rand() < 0.12:  # the same person signs again
                        fp = prints[randrange(len(prints))]
                    else:
                        fp = self._fingerprint(supporter_id)
                        prints.append(fp)
                    rank: int | None = self.fingerprint_uses.get(fp, 0)
                    self.fingerprint_uses[fp] = (rank or 0) + 1
                    if rand() < 0.05:
                        rank = None  # not ranked yet
                    area = None if rand() < 0.2 else AREAS[min(int(rand() ** 2 * 30), 29)]
                    supporters.append(
                        (supporter_id, cid, page_id, fp, area, s_status[j], rank, at, at)
                    )
                    known.append(supporter_id)
                    action_type = ACTION_TYPES_NEW[randrange(2)]
                testing = rand() < 0.01
                actions.append(
                    (self._next("actions"), supporter_id, action_type, cid, page_id,
                     a_status[j], testing, at, at)
                )  # fmt: skip
            self.n_supporters += len(supporters)
            yield supporters, actions


PAGE_COLUMNS = (
    "id", "name", "campaign_id", "org_id", "extra_supporters", "inserted_at", "updated_at",
)  # fmt: skip
SUPPORTER_COLUMNS = (
    "id", "campaign_id", "action_page_id", "fingerprint", "area", "processing_status",
    "dupe_rank", "inserted_at", "updated_at",
)  # fmt: skip
ACTION_COLUMNS = (
    "id", "supporter_id", "action_type", "campaign_id", "action_page_id", "processing_status",
    "testing", "inserted_at", "updated_at",
)  # fmt: skip


async def _prefetched(chunks: Iterator[_Chunk]) -> AsyncIterator[_Chunk]:
    """Generate the next chunk in a worker thread while Postgres ingests the current one."""
    done = object()
    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, done))
    while True:
        chunk = await pending
        if chunk is done:
            return
        pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, done))
        yield chunk  # type: ignore[misc]


async def _first_ids(conn: asyncpg.Connection) -> dict[str, int]:
    ids = {}
    for table in ("orgs", "campaigns", "action_pages", "supporters", "actions"):
        ids[table] = await conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {table}")
    return ids


async def fill_demo(
    conn: asyncpg.Connection, *, actions: int, seed: int = 1, progress: bool = True
) -> DemoSummary:
    """Add ``actions`` demo actions (and their campaigns, orgs, pages, supporters) by COPY.

    Runs in one transaction: an interrupted demo leaves nothing behind.
    """
    from tqdm import tqdm

    if actions < 0:
        raise ValueError("actions must be >= 0")
    t0 = time.perf_counter()
    async with conn.transaction():
        await conn.execute("LOCK TABLE orgs, campaigns, action_pages, supporters, actions")
        gen = _Generator(actions, seed, await _first_ids(conn))
        if await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # The rows are generated consistent; skipping per-row foreign-key triggers is what
            # lets COPY reach 100,000 actions/s. Only a superuser may do this; others just wait.
            await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.copy_records_to_table(
            "orgs", records=gen.orgs, columns=("id", "name", "inserted_at", "updated_at")
        )
        await conn.copy_records_to_table(
            "campaigns",
            records=gen.campaigns,
            columns=("id", "name", "org_id", "status", "inserted_at", "updated_at"),
        )
        await conn.copy_records_to_table(
            "action_pages",
            records=gen.pages,
            columns=PAGE_COLUMNS,
        )
        with tqdm(total=actions, unit="action", disable=not progress, desc="demo") as bar:
            async for supporters, action_rows in _prefetched(gen.chunks()):
                await conn.copy_records_to_table(
                    "supporters", records=supporters, columns=SUPPORTER_COLUMNS
                )
                await conn.copy_records_to_table(
                    "actions", records=action_rows, columns=ACTION_COLUMNS
                )
                bar.update(len(action_rows))
        for table in ("orgs", "campaigns", "action_pages", "supporters", "actions"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )
    await conn.execute("ANALYZE orgs, campaigns, action_pages, supporters, actions")
    summary = DemoSummary(
        campaigns=len(gen.campaigns),
        orgs=len(gen.orgs),
        action_pages=len(gen.pages),
        supporters=gen.n_supporters,
        actions=actions,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "demo.done",
        campaigns=summary.campaigns,
        orgs=summary.orgs,
        action_pages=summary.action_pages,
        supporters=summary.supporters,
        actions=summary.actions,
        seconds=round(summary.seconds, 2),
        actions_per_second=round(summary.actions_per_second),
    )
    return summary
