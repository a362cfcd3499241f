"""The exception tree: one root, one subclass per wire error code.

The wire codes are listed in shared/PROTOCOL.md. Each class carries its code in ``code``
and registers itself in ``ERRORS_BY_CODE`` so that a client can turn an ``err`` reply back
into the same class the server raised; nothing ever matches on message text.
"""

from __future__ import annotations

from typing import ClassVar


class StatsError(Exception):
    """Root of every error campaignstats raises on purpose."""

    code: ClassVar[str] = "internal"


ERRORS_BY_CODE: dict[str, type[ProtocolError]] = {}


class ProtocolError(StatsError):
    """An error that has a wire code (``["err", req_id, code, message]``)."""

    code: ClassVar[str] = "internal"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        ERRORS_BY_CODE[cls.code] = cls

    @classmethod
    def from_code(cls, code: str, message: str) -> ProtocolError:
        """The exception matching a wire code; unknown codes become :class:`InternalError`."""
        return ERRORS_BY_CODE.get(code, InternalError)(message)


class BadFrame(ProtocolError):
    """Bytes that are not MessagePack, or a value over the size limit. Fatal to a connection."""

    code = "bad_frame"


class BadMessage(ProtocolError):
    """Not an array, unknown op, wrong number or types of fields."""

    code = "bad_message"


class Invalid(ProtocolError):
    """A well-formed field out of range (id < 1, empty string, count < 1, over a limit...)."""

    code = "invalid"


class Unauthorized(ProtocolError):
    """Missing or wrong token."""

    code = "unauthorized"


class Overloaded(ProtocolError):
    """The server refuses work it cannot take now (too many connections...)."""

    code = "overloaded"


class InternalError(ProtocolError):
    """A bug or an unexpected failure on the server side."""

    code = "internal"


ERRORS_BY_CODE["internal"] = InternalError


class ActorStopped(StatsError):
    """The stats actor is not running (stopped, or restarting after a crash)."""


class CalculationError(StatsError):
    """The calculation from Postgres failed (database down, statement timeout, ...)."""
