"""Which event loop the server runs on: asyncio's own, or uvloop when it is installed.

uvloop is an optional dependency (``pip install uvloop``, or the ``[bench]`` extra): the server
works the same on both, and ``serve --loop auto`` (the default) takes uvloop when it can be
imported. What each costs is measured by ``python -m bench.run`` and ``--uvloop`` (README,
"Benchmarks").
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from campaignstats.errors import UsageError

__all__ = ["LOOPS", "runner"]

LOOPS = ("auto", "asyncio", "uvloop")

_T = TypeVar("_T")
Runner = Callable[[Coroutine[Any, Any, _T]], _T]


def runner(choice: str) -> tuple[str, Runner[Any]]:
    """The loop's name and the function that runs a coroutine on it (``asyncio.run`` or
    ``uvloop.run``). ``auto``: uvloop if it is installed, else asyncio. Raises
    :class:`~campaignstats.errors.UsageError` for ``uvloop`` when it is not installed."""
    if choice not in LOOPS:
        raise UsageError(f"unknown event loop {choice!r}", hint=" or ".join(LOOPS))
    if choice == "asyncio":
        return "asyncio", asyncio.run
    try:
        uvloop = importlib.import_module("uvloop")
    except ModuleNotFoundError:
        if choice == "uvloop":
            raise UsageError(
                "--loop uvloop: uvloop is not installed", hint="pip install uvloop"
            ) from None
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run
