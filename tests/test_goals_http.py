"""Goals over HTTP (docs/http.md): ``GET /v1/campaigns/{id}/goals`` answers as ``get_goals``, and
the events stream carries ``event: milestone`` and ``event: quorum`` with the EVENT JSON."""

from __future__ import annotations

from .test_http import (
    Events,
    Http,
    http,
    make_http,
    metric_values,
    send_and_flush,
    socket_peer,
)

__all__ = ["http", "make_http"]  # the fixtures, used by name


async def test_the_goals_read_answers_like_get_goals_and_refuses_a_bad_id(http: Http) -> None:
    raw = await socket_peer(http)
    try:
        assert (await raw.call("set_goals", 1, 970, {"supporters": [2, 9], "area": {"DE": 1}}))[
            0
        ] == "ok"
        await send_and_flush(raw, ["incs", [[970, 7, "register", "DE", True]] * 3])
        r = await http.client.get("/v1/campaigns/970/goals")
        assert r.status_code == 200
        assert r.json() == {
            "supporters": [2, 9],
            "reached": [2],
            "next": 9,
            "area": {"DE": 1},
            "areas_reached": ["DE"],
        }
        assert r.json() == (await raw.call("get_goals", 2, 970))[2]
        default = (await http.client.get("/v1/campaigns/971/goals")).json()
        assert default["supporters"][:3] == [100, 200, 500]
        assert default["next"] == 100
        assert (await http.client.get("/v1/campaigns/x/goals")).status_code == 400
    finally:
        await raw.close()


async def test_the_event_stream_carries_milestones_and_quorums_once(http: Http) -> None:
    raw = await socket_peer(http)
    try:
        assert (await raw.call("set_goals", 1, 972, {"supporters": [2], "area": {"FR": 2}}))[
            0
        ] == "ok"
        async with http.client.stream("GET", "/v1/campaigns/972/events") as r:
            events = Events(r)
            event, _ = await events.next()
            assert event == "stats"
            await send_and_flush(raw, ["incs", [[972, 7, "register", "FR", True]] * 2])
            seen: list[tuple[str, dict[str, object]]] = []
            while len(seen) < 2:
                event, data = await events.next(within=5)
                if event != "stats":
                    seen.append((event, data))
            (kind1, milestone), (kind2, quorum) = seen
            assert kind1 == "milestone"
            assert kind2 == "quorum"
            assert milestone["threshold"] == 2
            assert milestone["metric"] == "supporters"
            assert milestone["value"] == 2
            assert quorum["area"] == "FR"
            assert quorum["threshold"] == 2
            assert set(quorum) == {"type", "area", "threshold", "value", "at"}
        metrics = metric_values((await http.client.get("/metrics")).text)
        assert metrics[("campaignstats_goal_events_total", ())] == 2
        # no webhooks configured: nothing delivered, nothing owed
        assert metrics[("campaignstats_webhook_pending", ())] == 0
        for outcome in ("delivered", "failed", "dead"):
            key = ("campaignstats_webhook_deliveries_total", (("outcome", outcome),))
            assert metrics[key] == 0, outcome
    finally:
        await raw.close()
