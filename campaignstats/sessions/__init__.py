"""Sans-IO sessions: the protocol's state machines, one per side, in the manner of h11.

A session owns hello, request ids, reply order and pending calls, and turns bytes into events
and requests into bytes; it never touches a socket, a thread or an event loop, so the socket
server and both clients are adapters that only move bytes and wait (docs/design.md, "The house").
"""
