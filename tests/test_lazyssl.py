"""asyncio loads without ssl, and gets it the moment anything imports ssl: TLS streams over
loopback still work, in a fresh interpreter (this one has ssl loaded long ago)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from eztunnel_lab.simpki import MeshCA
from eztunnel_plugin import lazyssl

from .conftest import run_isolated

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
    out = run_isolated(CHILD, str(bundle), str(ca.ca_file))
    assert out.strip() == "ping-pong"


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
    out = run_isolated(HASHLIB_CHILD)
    digest, loaded = out.split()
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


SSL_CHILD = r"""
import sys

from eztunnel_plugin.api import metrics  # prometheus_client, under ssl_deferred()
assert "_ssl" not in sys.modules and "ssl" not in sys.modules, "ssl ran at import"
assert "_hashlib" not in sys.modules, "hashlib ran at import"
import http.client, urllib.request
import prometheus_client.exposition as exposition

if sys.argv[1] == "import":
    import ssl  # anyone, later
else:
    # or a first use through a module that bound the stand-in: ssl's own class
    ctx = exposition.ssl.SSLContext(exposition.ssl.PROTOCOL_TLS_CLIENT)
    import ssl
    assert type(ctx) is ssl.SSLContext
assert exposition.ssl is ssl and http.client.ssl is ssl and urllib.request.ssl is ssl
conn = http.client.HTTPSConnection("127.0.0.1", 9)  # builds ssl's default context
assert type(conn._context) is ssl.SSLContext
assert not any(isinstance(f, lazyssl._SslFinder) for f in sys.meta_path)
print("ok")
"""


@pytest.mark.parametrize("first", ["import", "use"])
def test_ssl_deferred_hands_ssl_over_on_first_import_or_use(first: str) -> None:
    child = "from eztunnel_plugin import lazyssl\n" + SSL_CHILD
    out = run_isolated(child, first)
    assert out.strip()


def test_the_stand_in_carries_ssl_s_own_constants() -> None:
    import ssl

    for name, value in lazyssl._IMPORT_TIME_NAMES.items():
        if isinstance(value, int):
            assert getattr(ssl, name) == value, name
        else:
            assert isinstance(getattr(ssl, name), type), name


NEEDS_SSL_CHILD = r"""
import sys

from eztunnel_plugin import lazyssl

with lazyssl.ssl_deferred():
    import ssl  # a module that uses ssl while it is imported
    ctx = ssl.create_default_context()
import ssl as again

assert sys.modules["ssl"] is again and type(again) is type(sys)
assert type(ctx) is again.SSLContext and ssl.CERT_REQUIRED == again.CERT_REQUIRED
print("ok")
"""


def test_ssl_deferred_gives_the_real_ssl_to_an_import_that_needs_it() -> None:
    out = run_isolated(NEEDS_SSL_CHILD)
    assert out.strip() == "ok"


def test_ssl_deferred_keeps_a_loaded_ssl() -> None:
    import ssl

    with lazyssl.ssl_deferred():
        import ssl as again
    assert again is ssl and sys.modules["ssl"] is ssl
