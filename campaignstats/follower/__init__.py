"""Following the database: counts made live from Postgres's logical replication (docs/follow.md).

``pgoutput`` decodes the replication protocol (sans-IO), ``changes`` turns transactions into
increments and decrements (pure), ``follower`` polls the slot from asyncio and applies them
through the service's public API.
"""

from .follower import (
    DEFAULT_PUBLICATION,
    Follower,
    FollowError,
    FollowerStats,
    SlotBusy,
    default_slot_name,
    drop_slot,
    list_slots,
)

__all__ = [
    "DEFAULT_PUBLICATION",
    "FollowError",
    "Follower",
    "FollowerStats",
    "SlotBusy",
    "default_slot_name",
    "drop_slot",
    "list_slots",
]
