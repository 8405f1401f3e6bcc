"""tcprepair.rebuild_behind on real sockets (loopback): the connection lives on in the new
socket, and its next write repeats bytes the peer already has, which plain TCP drops."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from eztunnel_plugin import tcprepair

from .conftest import require_root

DATA = os.urandom(4096)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    require_root()  # TCP_REPAIR needs CAP_NET_ADMIN
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname(), timeout=5)
        server, _ = lsock.accept()
    server.settimeout(5)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def _read(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_the_repeat_reaches_the_peer_and_plain_tcp_skips_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(DATA[:1000])
    assert _read(server, 1000) == DATA[:1000]
    assert tcprepair.wait_acked(client, 5.0)
    new = tcprepair.rebuild_behind(client, 100)
    try:
        assert new.getpeername() == server.getsockname()
        new.sendall(DATA[900:1200])  # 100 bytes the server has, then 200 new ones
        assert _read(server, 200) == DATA[1000:1200]
        # The rebuilt socket carries the connection both ways, and closes it cleanly.
        server.sendall(b"back")
        assert _read(new, 4) == b"back"
        new.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""
    finally:
        new.close()


def test_a_socket_that_is_not_connected_is_refused_with_the_os_error() -> None:
    require_root()
    with socket.socket() as s, pytest.raises(OSError):
        tcprepair.rebuild_behind(s, 100)
