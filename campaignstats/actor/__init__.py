"""The actor floor: the task that owns the counts, its mailbox, supervisor and snapshot file."""

from .actor import ActorConfig, StatsActor
from .mailbox import Mailbox
from .supervisor import Supervisor, SupervisorGaveUp

__all__ = ["ActorConfig", "Mailbox", "StatsActor", "Supervisor", "SupervisorGaveUp"]
