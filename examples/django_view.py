"""A Django view that counts a signature as it commits, with its transaction id.

Not run by the suite (it needs Django and a Proca database); it shows where the calls go:

* one :class:`~campaignstats.client.StatsClient` per process, shared by every thread (gunicorn
  with ``--preload`` included: a forked worker opens its own connections);
* ``SELECT pg_current_xact_id()`` *inside* the transaction that saves the action: the server
  uses it to merge the increment with its next calculation exactly, whatever the order of
  commits (docs/design.md, "Exact by transaction id");
* ``increment()`` only once the transaction has committed (``transaction.on_commit``): an
  increment for an action that was rolled back would be counted until the next resync.
  It never blocks the request for long and never raises because the stats server is down.
"""

from __future__ import annotations

import os
from typing import Any

from django.db import connection, transaction  # type: ignore[import-not-found]
from django.http import HttpRequest, JsonResponse  # type: ignore[import-not-found]

from campaignstats.client import StatsClient

stats = StatsClient(os.environ.get("CAMPAIGNSTATS_URL", "tcp://127.0.0.1:7400"))


def sign(request: HttpRequest, campaign_id: int) -> Any:
    org_id, page_id = int(request.POST["org"]), int(request.POST["page"])
    area = request.POST.get("country") or None
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO actions (action_type, action_page_id, campaign_id, supporter_id, "
                "processing_status, inserted_at, updated_at) "
                "VALUES ('register', %s, %s, %s, 3, now(), now()) RETURNING id",
                [page_id, campaign_id, request.POST["supporter"]],
            )
            (action_id,) = cursor.fetchone()
            cursor.execute("SELECT pg_current_xact_id()::text::bigint")
            (txid,) = cursor.fetchone()
        transaction.on_commit(
            lambda: stats.increment(
                campaign_id,
                org_id,
                "register",
                area,
                new_supporter=True,
                action_id=action_id,
                txid=txid,
                page=page_id,
            )
        )
    return JsonResponse({"ok": True})


def counter(request: HttpRequest, campaign_id: int) -> Any:
    # A read on the caller's own thread and a pooled connection: no hand-off to another thread.
    return JsonResponse({"supporters": stats.stats(campaign_id, timeout=0.5)["supporters"]})
