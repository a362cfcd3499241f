"""Custom metrics of campaigns, beside Proca's fields (docs/metrics.md).

* :mod:`.update`: the UPDATE, its limits and its one validator (pure);
* :mod:`.uniques`: unique members, exact then a DataSketches CPC sketch (pure);
* :mod:`.model`: the state, ``apply``, the ``metrics`` query, guards, reset, snapshot bytes (pure);
* :mod:`.log`: the append-only log (files);
* :mod:`.store`: the state behind its log and snapshot file (files);
* :mod:`.archive`: the export to Parquet or CSV files (files).

The names below are imported lazily: the clients need :mod:`.update` only, and a plain
(client) install has no ``datasketches``, which :mod:`.uniques` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from campaignstats.metrics.log import FSYNC_POLICIES, FsyncPolicy, MetricsLog
    from campaignstats.metrics.model import Applied, GaugeReading, MetricsState
    from campaignstats.metrics.store import MetricsStore
    from campaignstats.metrics.uniques import UniqueSet, union
    from campaignstats.metrics.update import (
        DEFAULT_LIMITS,
        MetricLimits,
        MetricUpdate,
        make_update,
        update_from_map,
    )

_WHERE = {
    "FSYNC_POLICIES": "log",
    "FsyncPolicy": "log",
    "MetricsLog": "log",
    "Applied": "model",
    "GaugeReading": "model",
    "MetricsState": "model",
    "MetricsStore": "store",
    "UniqueSet": "uniques",
    "union": "uniques",
    "DEFAULT_LIMITS": "update",
    "MetricLimits": "update",
    "MetricUpdate": "update",
    "make_update": "update",
    "update_from_map": "update",
}

__all__ = [
    "DEFAULT_LIMITS",
    "FSYNC_POLICIES",
    "Applied",
    "FsyncPolicy",
    "GaugeReading",
    "MetricLimits",
    "MetricUpdate",
    "MetricsLog",
    "MetricsState",
    "MetricsStore",
    "UniqueSet",
    "make_update",
    "union",
    "update_from_map",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'campaignstats.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"campaignstats.metrics.{module}"), name)
