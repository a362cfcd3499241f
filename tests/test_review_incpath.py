"""Review of the incpath round (msgspec on both sides of a query, short-string decoders).

The client codec now decodes a reply that arrives whole in one read with msgspec and anything
else (a reply cut across reads, several in one read) with msgpack's Unpacker. The codec's
contract (campaignstats/protocol.py, its docstring) is that the same stream gives the same
messages whatever its chunking: these tests hold the clients to it over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgpack
import pytest

from campaignstats.client import AsyncStatsClient, StatsClient
from campaignstats.errors import BadFrame
from campaignstats.protocol import Call, ClientCodec, Hello, Ok, ServerCodec

from .test_clients import Fake, serving


class RawReplies(Fake):
    """A server that answers ``hello`` and then every call with the same raw ``result`` bytes,
    written whole or cut in two writes far enough apart to reach the client in two reads."""

    def __init__(self, result: bytes, *, cut: bool) -> None:
        super().__init__(lambda request: None)
        self.result = result
        self.cut = cut

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        codec = ServerCodec()
        try:
            while data := await reader.read(1 << 16):
                for msg in codec.receive_data(data):
                    if not isinstance(msg, Call):
                        continue
                    if isinstance(msg.request, Hello):
                        writer.write(codec.ok(msg.req_id, {"protocol": 1, "server": "raw"}))
                        continue
                    reply = b"\x93\xa2ok" + msgpack.packb(msg.req_id) + self.result
                    if self.cut:
                        writer.write(reply[:3])
                        await writer.drain()
                        await asyncio.sleep(0.05)
                        writer.write(reply[3:])
                    else:
                        writer.write(reply)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def raw_server(result: bytes, *, cut: bool) -> contextlib.AbstractAsyncContextManager[RawReplies]:
    return serving(RawReplies(result, cut=cut))


def shape(result: Any) -> str:
    """What a result is made of: its keys and values by type (an Ext's repr holds its address)."""
    if type(result) is not dict:
        return type(result).__name__
    return repr(sorted((type(k).__name__, type(v).__name__) for k, v in result.items()))


async def _async_call(port: int) -> tuple[str, str]:
    client = AsyncStatsClient(f"tcp://127.0.0.1:{port}", timeout=5.0)
    try:
        return "ok", shape(await client.info())
    except Exception:  # the outcome is what is compared: a value, or that it raised
        return "raised", ""
    finally:
        await client.close()


def _blocking_call(port: int) -> tuple[str, str]:
    client = StatsClient(f"tcp://127.0.0.1:{port}", timeout=5.0)
    try:
        return "ok", shape(client.info())
    except Exception:
        return "raised", ""
    finally:
        client.close()


# Values a MessagePack peer may send that msgspec and msgpack read differently: a timestamp
# (msgspec: datetime; msgpack: Timestamp), another extension type (Ext against ExtType), and a
# map keyed by an array (msgspec: a tuple key; msgpack: refused, unhashable list).
ODD_RESULTS = {  # each an ``info`` map
    "timestamp": msgpack.packb({"at": msgpack.Timestamp(1, 0)}),
    "extension": msgpack.packb({"x": msgpack.ExtType(5, b"ab")}),
    "array key": b"\x81\x92\x01\x02\x03",
}


@pytest.mark.parametrize("result", list(ODD_RESULTS.values()), ids=list(ODD_RESULTS))
def test_the_client_codec_reads_a_reply_alike_whole_and_cut_anywhere(result: bytes) -> None:
    wire = b"\x93\xa2ok\x01" + result
    outcomes = []
    for cut in range(len(wire)):
        codec = ClientCodec()
        try:
            [reply] = [*codec.receive_data(wire[:cut]), *codec.receive_data(wire[cut:])]
            assert isinstance(reply, Ok)
            outcomes.append(("ok", shape(reply.result)))
        except BadFrame:
            outcomes.append(("raised", ""))
    assert len(set(outcomes)) == 1, outcomes


@pytest.mark.parametrize("result", list(ODD_RESULTS.values()), ids=list(ODD_RESULTS))
@pytest.mark.parametrize("kind", ["async", "blocking"])
async def test_both_clients_give_the_same_outcome_for_a_reply_in_one_read_or_in_two(
    result: bytes, kind: str
) -> None:
    outcomes = []
    for cut in (False, True):
        async with asyncio.timeout(20), raw_server(result, cut=cut) as fake:
            if kind == "async":
                outcome = await _async_call(fake.port)
            else:
                outcome = await asyncio.to_thread(_blocking_call, fake.port)
        outcomes.append(outcome)
    assert outcomes[0] == outcomes[1]
