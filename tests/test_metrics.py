"""Custom metrics (docs/metrics.md): the validator, every update kind with and without dims,
gauge buckets, limits, guards, reset, snapshot bytes, unique estimates and their merge, the
archive. Pure model tests: no I/O but the archive's files."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import pytest

from campaignstats.errors import BadMessage, Invalid
from campaignstats.metrics import (
    MetricLimits,
    MetricsState,
    MetricUpdate,
    UniqueSet,
    make_update,
    union,
    update_from_map,
)
from campaignstats.metrics.archive import Archiver, export, has_parquet
from campaignstats.metrics.model import BUCKET, DAY
from campaignstats.metrics.uniques import EXACT_LIMIT

T0 = 1_796_000_100.0  # inside a 6-minute bucket and a UTC day, away from their edges


def check(item: dict[str, Any]) -> MetricUpdate:
    update = update_from_map(item)
    assert isinstance(update, MetricUpdate), update
    return update


def apply(state: MetricsState, now: float = T0, **item: Any) -> Any:
    return state.apply(check({"campaign": 1, **item}), now)


def total(state: MetricsState, now: float = T0, cid: int = 1) -> dict[str, Any]:
    return state.metrics(cid, now)["total"]  # type: ignore[no-any-return]


# -- the validator ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ([1, 2], BadMessage),
        ({"campaign": 1, "incr": {"a": 1}, "bogus": 1}, BadMessage),
        ({"incr": {"a": 1}}, BadMessage),
        ({"campaign": "1", "incr": {"a": 1}}, BadMessage),
        ({"campaign": 0, "incr": {"a": 1}}, Invalid),
        ({"campaign": 1, "incr": {"a": "1"}}, BadMessage),
        ({"campaign": 1, "incr": {"a": True}}, BadMessage),
        ({"campaign": 1, "incr": {"a": 2**63}}, Invalid),
        ({"campaign": 1, "incr": [1]}, BadMessage),
        ({"campaign": 1, "incr": {"": 1}}, Invalid),
        ({"campaign": 1, "incr": {"x" * 65: 1}}, Invalid),
        ({"campaign": 1, "incr": {"a": 1}, "set": {"a": 2}}, Invalid),
        ({"campaign": 1, "gauge": {"g": float("nan")}}, Invalid),
        ({"campaign": 1, "gauge": {"g": "1"}}, BadMessage),
        ({"campaign": 1, "member": {"u": []}}, Invalid),
        ({"campaign": 1, "member": {"u": [1]}}, BadMessage),
        ({"campaign": 1, "member": {"u": 7}}, BadMessage),
        ({"campaign": 1, "seen": "name"}, BadMessage),
        ({"campaign": 1, "seen": ["a"], "at": 1.7e12}, Invalid),
        ({"campaign": 1, "seen": ["a"], "at": "now"}, BadMessage),
        ({"campaign": 1, "dims": {"country": "total"}, "incr": {"a": 1}}, Invalid),
        ({"campaign": 1, "dims": {"country": 1}, "incr": {"a": 1}}, BadMessage),
        ({"campaign": 1, "dims": {f"d{i}": "k" for i in range(9)}, "incr": {"a": 1}}, Invalid),
        ({"campaign": 1}, Invalid),
        ({"campaign": 1, "incr": None, "seen": []}, Invalid),
    ],
)
def test_the_validator_names_wrong_shapes_bad_message_and_out_of_range_values_invalid(
    item: Any, error: type[Exception]
) -> None:
    assert type(update_from_map(item)) is error


def test_nil_optional_keys_take_their_defaults_and_a_single_member_is_a_list_of_one() -> None:
    update = check({"campaign": 1, "dims": None, "member": {"u": "a"}, "at": None})
    assert update.member == {"u": ("a",)}
    assert update.dims == {}
    assert update.at is None
    assert check(update.to_map()) == update


def test_make_update_raises_the_validators_error() -> None:
    with pytest.raises(Invalid):
        make_update(1, incr={"a": 1}, set={"a": 1})
    assert make_update(1, member={"u": ("a", "b")}).member == {"u": ("a", "b")}


# -- each update kind, without dims --------------------------------------------------------------


def test_incr_adds_and_set_replaces_a_counter() -> None:
    state = MetricsState()
    apply(state, incr={"shares": 2})
    apply(state, incr={"shares": 3, "clicks": -1})
    assert total(state)["counters"] == {"shares": 5, "clicks": -1}
    apply(state, set={"shares": 100})
    assert total(state)["counters"] == {"shares": 100, "clicks": -1}


def test_a_gauge_answers_the_last_complete_bucket_and_the_current_one() -> None:
    state = MetricsState()
    apply(state, T0, gauge={"online": 5})
    apply(state, T0 + 10, gauge={"online": 7})  # same bucket: the last value set wins
    reading = state.gauge(1, "online", T0 + 20)
    assert reading.previous is None
    assert reading.current == (int(T0 // BUCKET) * BUCKET, 7)
    later = T0 + BUCKET
    apply(state, later, gauge={"online": 9.5})
    reading = state.gauge(1, "online", later)
    assert reading.previous == (int(T0 // BUCKET) * BUCKET, 7)
    assert reading.current == (int(later // BUCKET) * BUCKET, 9.5)
    assert total(state, later)["gauges"] == {"online": 9.5}
    # Nothing set in the bucket after: the gauge keeps its value, the current bucket is empty.
    reading = state.gauge(1, "online", later + BUCKET)
    assert reading.current is None
    assert reading.previous is not None
    assert reading.previous[1] == 9.5
    assert total(state, later + BUCKET)["gauges"] == {"online": 9.5}


def test_gauge_buckets_are_bounded() -> None:
    state = MetricsState(MetricLimits(gauge_buckets=3))
    for i in range(10):
        apply(state, T0 + i * BUCKET, gauge={"g": i})
    (values,) = [v for _, _, _, v in state.iter_values()]
    assert sorted(values.gauges["g"].values()) == [7, 8, 9]
    apply(state, T0 + 10 * BUCKET, gauge={"g": 0}, at=T0)  # older than every kept bucket
    assert sorted(values.gauges["g"].values()) == [7, 8, 9]


def test_members_count_once_and_seen_keeps_the_latest_stamp() -> None:
    state = MetricsState()
    apply(state, member={"visitors": ["a", "b", "a"]})
    apply(state, member={"visitors": "b"})
    apply(state, seen=["visit"], at=T0 - 100)
    apply(state, seen=["visit"], at=T0 - 200)  # late and older: the stamp stays
    apply(state, T0 + 5, seen=["click"])  # no at: now
    values = total(state, T0 + 5)
    assert values["uniques"] == {"visitors": 2}
    assert values["last_seen"] == {"visit": T0 - 100, "click": T0 + 5}


def test_one_update_may_carry_every_kind() -> None:
    state = MetricsState()
    result = apply(
        state,
        incr={"a": 1},
        set={"b": 2},
        gauge={"c": 3.5},
        member={"d": ["x"]},
        seen=["e"],
    )
    assert result.error is None
    assert result.update.at == T0  # the time used is what the log records
    assert total(state) == {
        "counters": {"a": 1, "b": 2},
        "gauges": {"c": 3.5},
        "uniques": {"d": 1},
        "last_seen": {"e": T0},
    }


def test_an_unknown_campaign_has_empty_values() -> None:
    empty: dict[str, dict[str, Any]] = {
        "counters": {},
        "gauges": {},
        "uniques": {},
        "last_seen": {},
    }
    assert MetricsState().metrics(9, T0) == {"total": empty, "dims": {}}


# -- with dims ------------------------------------------------------------------------------------


def test_with_dims_an_update_counts_under_each_key_in_each_dims_total_and_in_the_total() -> None:
    state = MetricsState()
    apply(state, dims={"country": "es", "device": "mobile"}, incr={"signups": 1})
    apply(state, dims={"country": "fr"}, incr={"signups": 2}, member={"v": ["p", "q"]})
    apply(state, incr={"signups": 10}, member={"v": "q"})  # no dims: the total only
    apply(state, dims={"country": "es"}, member={"v": ["p", "z"]})
    reply = state.metrics(1, T0)
    assert reply["total"]["counters"] == {"signups": 13}
    assert reply["total"]["uniques"] == {"v": 3}
    country = reply["dims"]["country"]
    assert country["es"]["counters"] == {"signups": 1}
    assert country["fr"]["counters"] == {"signups": 2}
    assert country["total"]["counters"] == {"signups": 3}
    assert country["es"]["uniques"] == {"v": 2}
    assert country["total"]["uniques"] == {"v": 3}  # p, q, z: a union, not a sum
    device = reply["dims"]["device"]
    assert device == {
        "mobile": device["total"],
        "total": {"counters": {"signups": 1}, "gauges": {}, "uniques": {}, "last_seen": {}},
    }


def test_with_dims_set_gauge_and_seen_apply_to_every_scope_the_update_touches() -> None:
    state = MetricsState()
    apply(state, dims={"country": "es"}, set={"followers": 50}, gauge={"g": 1}, seen=["s"])
    apply(state, T0 + 1, dims={"country": "fr"}, set={"followers": 20}, gauge={"g": 2})
    reply = state.metrics(1, T0 + 1)
    country = reply["dims"]["country"]
    assert country["es"]["counters"] == {"followers": 50}
    # set replaces in every scope it touches (incr is the way to keep totals as sums)
    assert country["total"]["counters"] == {"followers": 20}
    assert reply["total"]["counters"] == {"followers": 20}
    assert country["es"]["gauges"] == {"g": 1}
    assert country["total"]["gauges"] == {"g": 2}
    assert reply["total"]["last_seen"] == {"s": T0}
    assert "last_seen" in country["fr"]
    assert country["fr"]["last_seen"] == {}


# -- limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "first", "over", "reason"),
    [
        (MetricLimits(max_names=2), {"incr": {"a": 1, "b": 1}}, {"seen": ["c"]}, "names"),
        (
            MetricLimits(max_dims=1),
            {"dims": {"x": "1"}, "incr": {"a": 1}},
            {"dims": {"y": "1"}, "incr": {"a": 1}},
            "dims",
        ),
        (
            MetricLimits(max_keys=1),
            {"dims": {"x": "1"}, "incr": {"a": 1}},
            {"dims": {"x": "2"}, "incr": {"a": 1}},
            "keys",
        ),
        (
            MetricLimits(max_unique_series=3),
            {"dims": {"x": "1"}, "member": {"u": "m"}},
            {"dims": {"x": "2"}, "member": {"u": "m"}},
            "unique_series",
        ),
        (MetricLimits(), {"incr": {"a": 2**63 - 1}}, {"incr": {"a": 1}}, "overflow"),
    ],
)
def test_an_update_past_a_limit_is_refused_whole_counted_and_changes_nothing(
    limits: MetricLimits, first: dict[str, Any], over: dict[str, Any], reason: str
) -> None:
    state = MetricsState(limits)
    assert apply(state, **first).error is None
    before = state.snapshot()
    result = apply(state, **over)
    assert isinstance(result.error, Invalid)
    assert result.update is None
    assert state.info()["rejected"] == {reason: 1}
    assert MetricsState.restore(state.snapshot()).metrics(1, T0) == MetricsState.restore(
        before
    ).metrics(1, T0)


def test_campaigns_past_max_campaigns_are_refused_and_existing_ones_keep_counting() -> None:
    state = MetricsState(MetricLimits(max_campaigns=1))
    assert apply(state, incr={"a": 1}).error is None
    assert isinstance(state.apply(check({"campaign": 2, "incr": {"a": 1}}), T0).error, Invalid)
    assert apply(state, incr={"a": 1}).error is None
    assert total(state)["counters"] == {"a": 2}


# -- guards ---------------------------------------------------------------------------------------


def test_a_deadline_refuses_later_updates_of_that_metric_only_and_counts_them() -> None:
    state = MetricsState()
    state.set_guard(1, "votes", deadline=T0)
    assert apply(state, T0, incr={"votes": 1}).refused == {}
    result = apply(state, T0 + 1, incr={"votes": 1, "views": 1})
    assert result.refused == {"votes": "deadline"}
    assert result.update is not None
    assert result.update.incr == {"views": 1}  # what the log records: the refused name left out
    assert apply(state, T0 + 2, incr={"votes": 1}).update is None
    assert total(state)["counters"] == {"votes": 1, "views": 1}
    assert state.info()["refused"] == {"deadline": 2, "throttle": 0}


def test_a_minimum_period_refuses_updates_of_one_key_inside_it_and_counts_them() -> None:
    state = MetricsState()
    state.set_guard(1, "pings", min_period=10)
    es, fr = {"country": "es"}, {"country": "fr"}
    assert apply(state, T0, dims=es, incr={"pings": 1}).refused == {}
    assert apply(state, T0 + 5, dims=es, incr={"pings": 1}).refused == {"pings": "throttle"}
    assert apply(state, T0 + 5, dims=fr, incr={"pings": 1}).refused == {}  # another key
    assert apply(state, T0 + 10, dims=es, incr={"pings": 1}).refused == {}
    assert state.metrics(1, T0)["dims"]["country"]["es"]["counters"] == {"pings": 2}
    assert state.info()["refused"] == {"deadline": 0, "throttle": 1}
    state.set_guard(1, "pings")  # no deadline, no period: the guard is gone
    assert apply(state, T0 + 11, dims=es, incr={"pings": 1}).refused == {}


def test_a_minimum_period_must_be_positive() -> None:
    with pytest.raises(Invalid):
        MetricsState().set_guard(1, "a", min_period=0)


# -- reset ----------------------------------------------------------------------------------------


def test_reset_drops_one_metric_in_every_scope_and_keeps_the_guards() -> None:
    state = MetricsState()
    state.set_guard(1, "a", deadline=T0 + 100)
    apply(state, dims={"c": "es"}, incr={"a": 1, "b": 1}, member={"a": "x"})
    assert state.reset(1, "a")
    reply = state.metrics(1, T0)
    assert reply["total"]["counters"] == {"b": 1}
    assert reply["total"]["uniques"] == {}
    assert reply["dims"]["c"]["es"]["counters"] == {"b": 1}
    assert state.campaigns[1].unique_series == 0
    assert state.campaigns[1].guards
    assert not state.reset(1, "nothing")


def test_reset_of_a_campaign_drops_all_its_metrics_and_frees_its_limits() -> None:
    state = MetricsState(MetricLimits(max_names=1))
    apply(state, dims={"c": "es"}, incr={"a": 1})
    assert state.reset(1)
    assert state.metrics(1, T0) == MetricsState().metrics(1, T0)
    assert apply(state, incr={"b": 1}).error is None
    assert not state.reset(2)


# -- snapshot bytes -------------------------------------------------------------------------------


def test_a_snapshot_restores_every_value_guard_and_count() -> None:
    state = MetricsState()
    state.set_guard(1, "g", deadline=T0 + 50, min_period=1.5)
    apply(state, dims={"c": "es"}, incr={"a": 3}, gauge={"g": 2.5}, seen=["s"])
    apply(state, member={"big": [str(i) for i in range(EXACT_LIMIT + 50)]})
    apply(state, member={"small": ["x", "y"]}, set={"b": -4})
    apply(state, T0 + 100, incr={"g": 1})  # refused: counted
    restored = MetricsState.restore(state.snapshot())
    assert restored.metrics(1, T0) == state.metrics(1, T0)
    assert restored.campaigns[1].guards == state.campaigns[1].guards
    assert restored.info() == state.info()
    assert restored.campaigns[1].names == state.campaigns[1].names
    assert restored.campaigns[1].unique_series == state.campaigns[1].unique_series
    # the restored sketch keeps counting
    apply(restored, member={"big": ["new one"]})
    assert total(restored)["uniques"]["big"] >= total(state)["uniques"]["big"]


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x80", b"\x82\xa6format\x01\xa9campaigns\x01"])
def test_restore_refuses_what_is_not_a_snapshot(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        MetricsState.restore(data)


def test_restore_skips_a_row_that_is_not_a_campaigns_and_says_so() -> None:
    # one bad row costs that campaign only (docs/metrics.md, "Durability")
    restored = MetricsState.restore(b"\x82\xa6format\x01\xa9campaigns\x91\x93\x01\x02\x03")
    assert restored.campaigns == {}
    assert len(restored.skipped_rows) == 1


# -- unique estimates ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10**2, 10**3, 10**4, 10**5, 10**6])
def test_unique_estimates_are_exact_when_small_and_within_2_percent_past_10000(n: int) -> None:
    members = UniqueSet()
    batch: list[str] = []
    for i in range(n):
        batch.append(f"supporter-{i}@example.org")
        if len(batch) == 1000:
            members.add(batch)
            members.add(batch[:10])  # repeats count once
            batch = []
    members.add(batch)
    estimate = members.estimate()
    if n <= EXACT_LIMIT:
        assert members.is_exact
        assert estimate == n
    else:
        low, high = members.bounds(3)
        assert low <= n <= high
    if n >= 10_000:
        assert abs(estimate - n) / n <= 0.02, estimate


@pytest.mark.parametrize("per_day", [60, 3_000, 40_000])
def test_daily_sets_merged_into_a_week_and_a_month_match_the_exact_union(per_day: int) -> None:
    rng = random.Random(per_day)
    state = MetricsState()
    start = (int(T0) // DAY) * DAY
    pool = per_day * 3  # returning visitors: days overlap
    exact_days: list[set[str]] = []
    for day in range(31):
        members = {f"m{rng.randrange(pool)}" for _ in range(per_day)} | {f"d{day}"}
        exact_days.append(members)
        ordered = sorted(members)
        for i in range(0, len(ordered), 1000):  # at most max_members in one update
            apply(state, start + day * DAY + 60, member={"visitors": ordered[i : i + 1000]})
    for first, days in ((0, 7), (7, 7), (0, 31)):
        merged = state.uniques_between(
            1, "visitors", start + first * DAY, start + (first + days) * DAY
        )
        truth = len(set().union(*exact_days[first : first + days]))
        if truth <= EXACT_LIMIT:
            assert merged.estimate() == truth
        else:
            assert abs(merged.estimate() - truth) / max(truth, 1) <= 0.02, (merged, truth)
    # the all-time set and the union of every day agree (two estimators: within the bound)
    every_day = state.uniques_between(1, "visitors", 0, 2**40).estimate()
    assert abs(total(state)["uniques"]["visitors"] - every_day) <= 0.02 * every_day


def test_a_union_of_exact_and_sketched_sets_counts_the_overlap_once() -> None:
    small, big = UniqueSet(), UniqueSet()
    small.add(["a", "b", "0"])
    big.add([str(i) for i in range(20_000)])
    merged = union([small, big])
    assert abs(merged.estimate() - 20_002) / 20_002 <= 0.02
    assert union([small, small]).estimate() == 3


# -- archive --------------------------------------------------------------------------------------


def _archived_state() -> MetricsState:
    state = MetricsState()
    apply(state, T0, dims={"c": "es"}, incr={"a": 2}, gauge={"g": 1}, member={"u": "x"})
    apply(state, T0 + BUCKET, gauge={"g": 2}, seen=["s"])
    return state


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_archive_writes_values_and_completed_gauge_buckets_one_file_per_period(
    fmt: str, tmp_path: Path
) -> None:
    if fmt == "parquet" and not has_parquet():
        pytest.skip("pyarrow is not installed (the [archive] extra)")
    state = _archived_state()
    bucket = int(T0 // BUCKET) * BUCKET
    period = (bucket // 3600) * 3600
    path = export(state, tmp_path, period, period + 7200, fmt)  # type: ignore[arg-type]
    assert path is not None
    assert path.name.endswith(f".{fmt}")
    if fmt == "csv":
        with path.open() as f:
            rows = list(csv.DictReader(f))
    else:
        import pyarrow.parquet as pq

        rows = [
            {k: "" if v is None else str(v) for k, v in row.items()}
            for row in pq.read_table(path).to_pylist()
        ]
    by = {(r["dim"], r["key"], r["kind"], r["name"], r["bucket_start"]): r for r in rows}
    assert by[("", "", "counter", "a", "")]["count"] == "2"
    assert by[("c", "es", "counter", "a", "")]["count"] == "2"
    assert by[("c", "", "unique", "u", "")]["count"] == "1"
    assert float(by[("", "", "last_seen", "s", "")]["value"]) == T0 + BUCKET
    gauges = sorted(
        (r["bucket_start"], r["value"]) for r in rows if r["kind"] == "gauge" and not r["dim"]
    )
    # the buckets completed inside the period, each once
    assert gauges == [(str(bucket), "1.0"), (str(bucket + BUCKET), "2.0")]
    again = export(state, tmp_path, period, period + 7200, fmt)  # type: ignore[arg-type]
    assert again is None  # never overwritten


def test_the_archiver_exports_each_complete_period_once_and_catches_up(tmp_path: Path) -> None:
    state = _archived_state()
    archiver = Archiver(tmp_path, period=600, fmt="csv")
    now = T0 + 3 * 600
    first = archiver.run(state, now)
    assert len(first) == 1
    assert not archiver.due(now + 1)
    assert archiver.run(state, now + 1) == []
    later = archiver.run(state, now + 3 * 600)
    assert len(later) == 3
    assert len(list(tmp_path.iterdir())) == 4
