"""Embedding campaignstats in an asyncio application, without the socket server.

    python examples/embedded.py                 # the embedded Postgres in ./.campaignstats
    python examples/embedded.py --dsn postgresql://user@host/proca

The service loads the counts from Postgres, then the application counts actions as they happen
and reads the live figures from memory; a resync every minute keeps them exact.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import campaignstats
from campaignstats.logs import configure_logging


async def main(dsn: str | None) -> None:
    async with campaignstats.open_stats(dsn=dsn, sync_interval=60) as stats:
        async with asyncio.timeout(60):
            await stats.loaded()  # the start-up calculation has been merged

        # Your request handlers call this after saving an action: it never waits.
        stats.increment(
            campaign_id=1, org_id=1, action_type="register", area="DE", new_supporter=True
        )
        stats.increment(campaign_id=1, org_id=1, action_type="share")
        await stats.flush()  # only so that the print below sees them

        print("campaign 1:", await stats.stats(1))
        updates = await stats.subscribe(1)  # live updates, at most once per second
        stats.increment(1, 1, "share")
        async for campaign_id, new_stats in updates:
            print("update for campaign", campaign_id, "->", new_stats["action"])
            break
        updates.close()
        info = await stats.info()
        print(
            "campaigns in memory:",
            info["campaigns"],
            "| last calculation:",
            info["last_calculation"],
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    configure_logging("console", "warning")
    asyncio.run(main(args.dsn))
