"""Instructions per single ``inc`` message through the server's real path, for callgrind.

    python -m bench.inc_path --n 20000 --stage server        # one run, prints its checks
    python -m bench.inc_path --callgrind [--n 20000 --base 5000] [--stage all]

The machine is shared, so a clock measures the neighbours too; callgrind counts the
instructions this process executes, the same on a busy machine as on a quiet one. What runs is
the socket server's own read callback: a :class:`~campaignstats.server.StatsServer` on the
bench's empty source (no database, no journal: as ``bench.run``'s server), one
:class:`~campaignstats.server.Connection` whose transport is a stub that keeps what is written,
fed a recorded stream of ``N`` single ``inc`` messages (bench/_data.py's workload, seed 42) in
reads of the server's ``read_size`` (32 KiB) through ``buffer_updated``; after each read the
event loop runs until the actor has applied it (its slices of 250, a turn of the loop between
two). At the end a ``flush`` is answered and the totals are compared with the same increments
applied to a fresh :class:`~campaignstats.model.StatsState`: a count that is not exact does not
count.

``--stage`` runs a part of that path alone, so that the differences say where the instructions
go: ``codec`` (``ServerCodec.receive_data`` per read), ``session`` (``ServerSession``: codec,
batching, events), ``apply`` (the codec, then ``StatsState.apply_many`` in slices of 250 on
what it decoded), ``server`` (everything above, plus the connection, the producer, the mailbox,
the actor's turns and the event loop).

``--stage queries`` (``ping``, ``stats``) counts a query instead: the same server holding
100,000 increments of the workload, then ``N`` calls, each in a read of its own through
``buffer_updated`` and answered inline (``ping`` by the session, ``stats`` through the actor's
read door), as an idle server answers them.

``--callgrind`` runs each stage twice under ``valgrind --tool=callgrind``, with ``--n`` and
with ``--base`` messages, and prints (Ir(n) - Ir(base)) / (n - base): the start-up (imports,
the workload's generation, the server's start) cancels out. Rerun it before and after a change
(the numbers of a stage are reproducible to a fraction of a percent).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pickle
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import msgpack
import structlog

from bench import _data
from bench._server import EmptySource
from campaignstats.actor import actor as actor_module
from campaignstats.actor.actor import ActorConfig
from campaignstats.model import Increment, IncrementLike, StatsState
from campaignstats.protocol import Batch, ServerCodec
from campaignstats.requests import Flush
from campaignstats.server import DEFAULT_READ_SIZE, Connection, ServerConfig, StatsServer
from campaignstats.service import StatsService
from campaignstats.sessions.server import CastReceived, ServerSession

SEED = 42
STAGES = ("codec", "session", "apply", "server")
ROOT = Path(__file__).parent.parent


class StubTransport:
    """What a connection needs of its transport: it writes into a list and never blocks."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.paused = 0

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


def reads(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def run_codec(chunks: list[bytes]) -> int:
    codec = ServerCodec()
    n = 0
    for chunk in chunks:
        for msg in codec.receive_data(chunk):
            assert isinstance(msg, Batch)
            assert not msg.rejected
            n += len(msg.items)
    return n


def run_session(chunks: list[bytes]) -> int:
    session = ServerSession()
    n = 0
    for chunk in chunks:
        for event in session.receive_data(chunk):
            assert isinstance(event, CastReceived)
            n += len(event.cast.items)
    return n


def run_apply(chunks: list[bytes], slice_: int) -> StatsState:
    codec = ServerCodec()
    state = StatsState()
    for chunk in chunks:
        for msg in codec.receive_data(chunk):
            assert isinstance(msg, Batch)
            items = cast(Sequence[IncrementLike], msg.items)
            for start in range(0, len(items), slice_):
                assert not state.apply_many(items[start : start + slice_])
    return state


#: ActorConfig.apply_slice of the ``server`` stage (``--apply-slice``)
APPLY_SLICE = [ActorConfig().apply_slice]


async def run_server(chunks: list[bytes]) -> dict[int, Any]:
    config = ActorConfig(sync_interval=3600, backoff_initial=3600, apply_slice=APPLY_SLICE[0])
    service = StatsService(EmptySource(), config)
    await service.start()
    await service.loaded()
    server = StatsServer(service, ServerConfig(host="127.0.0.1", port=0))
    await server.start()
    try:
        conn = Connection(server)
        transport = StubTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        buffer = server.read_buffer
        mailbox = service.supervisor.mailbox
        sleep = asyncio.sleep
        for chunk in chunks:
            size = len(chunk)
            buffer[:size] = chunk
            conn.buffer_updated(size)
            while mailbox.depth() or mailbox.partial:
                await sleep(0)
            await sleep(0)  # the loop's turn after the read (the server's _read_on)
        await service.call(Flush())
        assert not transport.written, transport.written[:3]  # no error reply to any inc
        actor = service.supervisor.actor
        assert actor is not None
        campaigns = dict(actor.state.campaigns)
        conn.connection_lost(None)
    finally:
        await server.close()
        await service.stop()
    return campaigns


#: the query stages: one call per read, each read a fixed-size frame (req_id 7, campaign ids
#: of one byte), so that cutting the stream costs the same in every run
QUERY_STAGES = {"ping": 7, "stats": 9}
FILLED = 100_000  # increments applied before the queries (1,000 campaigns)


def query_frames(stage: str, n: int) -> bytes:
    rng = random.Random(SEED)
    if stage == "ping":
        return msgpack.packb(["ping", 7]) * n  # type: ignore[no-any-return]
    return b"".join(msgpack.packb(["stats", 7, rng.randint(1, 127)]) for _ in range(n))


async def run_queries(stage: str, stream: bytes) -> int:
    """A server holding ``FILLED`` increments, then the calls of ``stream``, one per read
    through ``buffer_updated`` (answered inline, as an idle server answers); returns the
    replies written."""
    service = StatsService(EmptySource(), ActorConfig(sync_interval=3600, backoff_initial=3600))
    await service.start()
    await service.loaded()
    server = StatsServer(service, ServerConfig(host="127.0.0.1", port=0))
    await server.start()
    try:
        actor = service.supervisor.actor
        assert actor is not None
        actor.state.apply_many([Increment(*item) for item in _data.generate(FILLED, SEED)])
        conn = Connection(server)
        transport = StubTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        buffer = server.read_buffer
        size = QUERY_STAGES[stage]
        for start in range(0, len(stream), size):
            buffer[:size] = stream[start : start + size]
            conn.buffer_updated(size)
        replies = len(transport.written)
        conn.connection_lost(None)
    finally:
        await server.close()
        await service.stop()
    return replies


def run(stage: str, stream: bytes) -> dict[int, Any] | int:
    """The stage over ``stream``: the totals it left, or (codec, session) the items it saw, or
    (the query stages) the replies written."""
    if stage in QUERY_STAGES:
        return asyncio.run(run_queries(stage, stream))
    chunks = reads(stream, DEFAULT_READ_SIZE)
    if stage == "codec":
        return run_codec(chunks)
    if stage == "session":
        return run_session(chunks)
    if stage == "apply":
        campaigns = run_apply(chunks, ActorConfig().apply_slice).campaigns
    else:
        campaigns = asyncio.run(run_server(chunks))
    return {cid: _data._totals(stats) for cid, stats in campaigns.items()}


def check(stage: str, n: int, result: dict[int, Any] | int, items: list[Any]) -> str:
    if isinstance(result, int):
        if result != n:
            raise SystemExit(f"{stage}: {result} seen, not {n}")
        return f"{stage}: {n} {'replies' if stage in QUERY_STAGES else 'increments'} seen"
    if not _data.same(result, _data.expected(items)):
        raise SystemExit(f"{stage}: the totals DO NOT MATCH")
    return f"{stage}: {n} increments, totals match"


_TOTAL = re.compile(r"^(?:summary|totals):\s*([\d,]+)", re.MULTILINE)


def instructions(stage: str, n: int, outdir: str) -> int:
    """Ir of one run of ``stage`` over the first ``n`` messages under callgrind (the workload
    is generated, and the result checked, out here: what callgrind counts is the stage)."""
    items = [] if stage in QUERY_STAGES else _data.generate(n, SEED)
    stream_file = os.path.join(outdir, f"stream.{stage}.{n}")
    result_file = os.path.join(outdir, f"result.{stage}.{n}")
    stream = query_frames(stage, n) if stage in QUERY_STAGES else _data.encode_incs(items, 1)
    Path(stream_file).write_bytes(stream)
    out = os.path.join(outdir, f"cg.{stage}.{n}")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    cmd += ["-m", "bench.inc_path", "--stage", stage, "--stream", stream_file]
    cmd += ["--result", result_file, "--apply-slice", str(APPLY_SLICE[0])]
    # One BLAS thread (numpy comes with datasketches): its idle threads spin for a while, and
    # under callgrind their spinning counts as much as the process's own work.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"callgrind failed ({done.returncode}): {done.stderr[-2000:]}")
    check(stage, n, pickle.loads(Path(result_file).read_bytes()), items)
    match = _TOTAL.search(Path(out).read_text())
    if match is None:
        raise SystemExit(f"no total in {out}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="single inc messages")
    parser.add_argument("--base", type=int, default=5_000, help="--callgrind: the smaller run")
    parser.add_argument(
        "--stage", default="server", choices=(*STAGES, *QUERY_STAGES, "all", "queries")
    )
    parser.add_argument("--callgrind", action="store_true", help="count instructions per inc")
    parser.add_argument("--keep", help="--callgrind: keep the callgrind files in this folder")
    parser.add_argument("--apply-slice", type=int, help="ActorConfig.apply_slice (server)")
    parser.add_argument("--stream", help=argparse.SUPPRESS)  # the run under callgrind
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if args.apply_slice is not None:
        APPLY_SLICE[0] = args.apply_slice
    stages = {"all": STAGES, "queries": tuple(QUERY_STAGES)}.get(args.stage, (args.stage,))
    if args.stream is not None:  # a run under callgrind: the stage alone
        # The actor looks at the campaigns that moved 10 times a second of the wall clock
        # (GOALS_TICK): under callgrind, some 50 times slower, that would be 50 times as
        # often per increment as in a real server, and more often in the longer run. Left
        # out: natively a look at the bench's 1,000 campaigns takes 0.07 ms (0.07% of a core).
        actor_module.GOALS_TICK = 3600.0
        # What is alive now stays out of the collector's passes, as ``serve`` does at its start:
        # else a full pass over the imports' objects, in one run and not in the other (by
        # where the allocation counts fall), costs some 1,000 instructions per increment.
        gc.collect()
        gc.freeze()
        result = run(args.stage, Path(args.stream).read_bytes())
        Path(args.result).write_bytes(pickle.dumps(result))
        return
    if not args.callgrind:
        items = _data.generate(args.n, SEED)
        stream = _data.encode_incs(items, 1)
        for stage in stages:
            given = query_frames(stage, args.n) if stage in QUERY_STAGES else stream
            print(check(stage, args.n, run(stage, given), items), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="inc-path-") as tmp:
        outdir = args.keep or tmp
        os.makedirs(outdir, exist_ok=True)
        n, base = args.n, args.base
        what = "call" if stages[0] in QUERY_STAGES else "single inc message"
        print(f"instructions per {what}: (Ir({n}) - Ir({base})) / {n - base}")
        for stage in stages:
            big = instructions(stage, args.n, outdir)
            small = instructions(stage, args.base, outdir)
            per = (big - small) / (args.n - args.base)
            unit = "call" if stage in QUERY_STAGES else "inc"
            print(f"  {stage:8} {per:10,.0f} Ir/{unit}   (Ir {small:,} and {big:,})", flush=True)


if __name__ == "__main__":
    main()
