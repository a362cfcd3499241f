"""The exception tree: one root, three branches, one class per wire error code.

* :class:`ProtocolError` and its subclasses carry a wire code (``["err", req_id, code, message]``,
  docs/protocol.md, "Errors"). Each class registers its code in ``ERRORS_BY_CODE`` so a client
  turns an ``err`` reply back into the class the server raised; nothing matches on message text.
  When the *peer* sent something it must not (a server reply that is not in the protocol, a
  client message the codec cannot read), the error is a :class:`RemoteProtocolError`; a client
  or server that is about to *send* something the protocol forbids raises
  :class:`LocalProtocolError` instead (h11's split: whose fault is it?).
* :class:`UsageError` is a misuse of the Python API (a bad argument, a call in the wrong state).
  It is also a :class:`ValueError`, so code written against the stdlib's habits still catches it.
* The rest describes the running system: the actor stopped, a calculation failed, the server is
  unreachable, a call timed out.
"""

from __future__ import annotations

from typing import ClassVar


class StatsError(Exception):
    """Root of every error campaignstats raises on purpose."""

    code: ClassVar[str] = "internal"


class UsageError(StatsError, ValueError):
    """The API was misused: a wrong argument or a call in the wrong state.

    ``hint`` says what to do instead, when there is something to say.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.hint = hint


# -- errors with a wire code ----------------------------------------------------------------------

ERRORS_BY_CODE: dict[str, type[ProtocolError]] = {}


class ProtocolError(StatsError):
    """An error that has a wire code."""

    code: ClassVar[str] = "internal"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Only the first class of a code registers: subclasses refine, they do not replace.
        ERRORS_BY_CODE.setdefault(cls.code, cls)

    @classmethod
    def from_code(cls, code: str, message: str) -> ProtocolError:
        """The exception matching a wire code; unknown codes become :class:`InternalError`."""
        return ERRORS_BY_CODE.get(code, InternalError)(message)


class BadFrame(ProtocolError):
    """Bytes that are not MessagePack, or a value over the size limit. Fatal to a connection."""

    code = "bad_frame"


class BadMessage(ProtocolError):
    """Not an array, unknown op, unknown key, wrong number or types of fields."""

    code = "bad_message"


class Invalid(ProtocolError):
    """A well-formed field out of range (id < 1, empty string, count < 1, over a limit...)."""

    code = "invalid"


class Unauthorized(ProtocolError):
    """Missing or wrong token."""

    code = "unauthorized"


class Overloaded(ProtocolError):
    """The server refuses work it cannot take now (full mailbox, too many connections...)."""

    code = "overloaded"


class WrongShard(Invalid):
    """A call about a campaign that this server (one shard of several) does not own; nothing
    was changed. Ask its owner (``campaignstats.shards.shard_of``, docs/scale.md). On the wire
    it is an ``invalid`` error naming the owner (the protocol's codes are a closed set), so a
    client raises :class:`Invalid` for it."""


class InternalError(ProtocolError):
    """A bug or an unexpected failure on the server side."""

    code = "internal"


ERRORS_BY_CODE["internal"] = InternalError


class RemoteProtocolError(BadFrame):
    """The peer broke the protocol: bytes or a message that no version of it allows."""


class LocalProtocolError(StatsError):
    """This side was about to break the protocol (a bug in the caller or in campaignstats)."""


# -- the running system ---------------------------------------------------------------------------


class ActorStopped(StatsError):
    """The stats actor is not running (stopped, or restarting after a crash)."""


class CalculationError(StatsError):
    """The calculation from Postgres failed (database down, statement timeout, ...)."""


class ServerUnavailable(StatsError, ConnectionError):
    """No usable connection to the server: refused, lost, or not established in time.

    Only calls raise it; ``increment()`` never does. Both a :class:`StatsError` (for code that
    catches everything from campaignstats) and a :class:`ConnectionError` (network trouble).
    """


class ConnectTimeout(ServerUnavailable, TimeoutError):
    """The connection (socket connect plus the ``hello`` round trip) took longer than allowed."""


class CallTimeout(StatsError, TimeoutError):
    """The server did not answer a call within its timeout (it may still be working on it)."""


class ClientClosed(StatsError, RuntimeError):
    """A call on a client after ``close()``: a bug in the caller, not a server problem."""
