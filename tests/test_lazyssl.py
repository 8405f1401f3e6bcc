"""asyncio loads without ssl, and gets it the moment anything imports ssl: TLS streams over
loopback still work, in a fresh interpreter (this one has ssl loaded long ago)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eztunnel_lab.simpki import MeshCA
from eztunnel_plugin import lazyssl

CHILD = r"""
import sys

import eztunnel_plugin.log  # any module of the package: asyncio comes without ssl
assert "asyncio" in sys.modules and "ssl" not in sys.modules and "_ssl" not in sys.modules

import ssl  # anyone, later
import asyncio, asyncio.base_events, asyncio.selector_events, asyncio.sslproto
assert asyncio.base_events.ssl is ssl and asyncio.selector_events.ssl is ssl
assert asyncio.sslproto.ssl is ssl


async def main(bundle, ca):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(bundle)
    client_ctx = ssl.create_default_context(cafile=ca)

    async def echo(reader, writer):
        writer.write(await reader.readexactly(4) + b"-pong")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with asyncio.timeout(20), server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"
        )
        assert writer.get_extra_info("ssl_object").version().startswith("TLS")
        writer.write(b"ping")
        await writer.drain()
        print((await reader.read()).decode())
        writer.close()


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_asyncio_tls_works_once_ssl_is_imported(tmp_path: Path) -> None:
    ca = MeshCA.create(tmp_path / "pki")
    bundle = ca.issue("server", "ns", "sa", "127.0.0.1")
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(ca.ca_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ping-pong"


def test_nothing_changes_where_asyncio_is_loaded_already() -> None:
    assert "asyncio" in sys.modules  # pytest's own
    before = list(sys.meta_path)
    lazyssl.import_asyncio()
    assert sys.meta_path == before


HASHLIB_CHILD = r"""
import sys

from eztunnel_plugin import lazyssl

with lazyssl.hashlib_deferred():
    import urllib.request  # binds hashlib
assert "_hashlib" not in sys.modules, "hashlib ran at import"
assert not any(isinstance(f, lazyssl._LazyFinder) for f in sys.meta_path)

import hashlib  # anyone, later: the same module, and it works

assert urllib.request.hashlib is hashlib
print(hashlib.sha256(b"abc").hexdigest(), "_hashlib" in sys.modules)
"""


def test_hashlib_deferred_loads_hashlib_on_first_use() -> None:
    r = subprocess.run(
        [sys.executable, "-I", "-c", HASHLIB_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    digest, loaded = r.stdout.split()
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert loaded == "True"


def test_hashlib_deferred_leaves_the_finders_as_they_were_on_error() -> None:
    before = list(sys.meta_path)
    with pytest.raises(ImportError), lazyssl.hashlib_deferred():
        import eztunnel_plugin.no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert sys.meta_path == before


def test_hashlib_deferred_keeps_a_loaded_hashlib() -> None:
    import hashlib

    with lazyssl.hashlib_deferred():
        import hashlib as again
    assert again is hashlib and type(again) is type(sys)
