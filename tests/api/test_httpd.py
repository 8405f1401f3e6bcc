"""The bounded HTTP server under metrics and health, in process: one GET answered and
closed, every refusal with its status and no traceback, and the bounds any client gets
(connections by number, each by time)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import structlog

from eztunnel_plugin.api import httpd
from eztunnel_plugin.config import Listen

Client = Callable[[bytes], Awaitable[bytes]]


def raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server answers before it closes."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # closed without a reply, our request unread
            pass
    return b"".join(chunks)


async def echo(path: str) -> httpd.Reply:
    if path == "/boom":
        raise RuntimeError("a bug in the handler")
    if path == "/nope":
        return httpd.refused(404)
    return httpd.Reply(200, f"path {path}\n".encode(), "text/x-test")


def serve(test: Callable[[int], Awaitable[None]], **bounds: float) -> None:
    async def main() -> None:
        server = await httpd.start(echo, Listen("127.0.0.1", 0), "test", **bounds)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        try:
            await test(port)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_one_get_is_answered_with_length_and_closed() -> None:
    async def test(port: int) -> None:
        got = await asyncio.to_thread(
            raw, port, b"GET /a/b?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        head, body = got.split(b"\r\n\r\n", 1)
        assert head.split(b"\r\n") == [
            b"HTTP/1.0 200 OK", b"Content-Type: text/x-test", b"Content-Length: 10",
            b"Connection: close",
        ]  # fmt: skip
        assert body == b"path /a/b\n"  # the query is not part of the path

    serve(test)


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET /" + b"a" * (100 << 10) + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * (100 << 10) + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * (httpd.MAX_HEADERS + 1) + b"\r\n", 431),
        (b"\x16\x03\x01garbage\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x", 400),  # closed before the headers end
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", 405),
        (b"HEAD / HTTP/1.1\r\n\r\n", 405),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    ],
)
def test_bad_requests_get_their_status_and_a_one_line_body(request_: bytes, status: int) -> None:
    async def test(port: int) -> None:
        def send() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request_)
                s.shutdown(socket.SHUT_WR)  # a request cut short ends here
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks)

        got = await asyncio.to_thread(send)
        head, body = got.split(b"\r\n\r\n", 1)
        assert head.startswith(f"HTTP/1.0 {status} {httpd.REASONS[status]}\r\n".encode())
        assert body == f"{httpd.REASONS[status].lower()}\n".encode()

    serve(test)


def test_a_handler_bug_closes_the_connection_without_a_traceback() -> None:
    async def test(port: int) -> None:
        assert await asyncio.to_thread(raw, port, b"GET /boom HTTP/1.1\r\n\r\n") == b""
        ok = await asyncio.to_thread(raw, port, b"GET /after HTTP/1.1\r\n\r\n")
        assert ok.endswith(b"path /after\n")  # the server goes on

    with structlog.testing.capture_logs() as logs:
        serve(test)
    assert logs == [
        {"event": "test.error", "log_level": "error", "error": "RuntimeError: a bug in the handler"}
    ]


def test_connections_are_bounded_in_number_and_time() -> None:
    async def test(port: int) -> None:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            # Both slots held by clients that send nothing: the next one is told 503...
            busy = await asyncio.to_thread(raw, port, b"GET / HTTP/1.1\r\n\r\n")
            assert busy.startswith(b"HTTP/1.0 503 ") and busy.endswith(b"too many connections\n")
            # ...and past twice the bound, closed without a word (two refusals held open).
            refusing = [socket.create_connection(("127.0.0.1", port), timeout=10)
                        for _ in range(2)]  # fmt: skip
            await asyncio.sleep(0.1)
            assert await asyncio.to_thread(raw, port, b"GET / HTTP/1.1\r\n\r\n") == b""
            for s in refusing:
                s.close()
            # The idle ones are closed at their deadline (well before the socket timeout),
            # and the slots come back.
            for s in idle:
                assert await asyncio.to_thread(s.recv, 1) == b""
            ok = await asyncio.to_thread(raw, port, b"GET /x HTTP/1.1\r\n\r\n")
            assert ok.endswith(b"path /x\n")
        finally:
            for s in idle:
                s.close()

    serve(test, max_connections=2, deadline_s=2.0)
