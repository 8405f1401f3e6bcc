"""asyncio without ssl until something imports ssl.

asyncio imports ssl at import time (libssl and libcrypto: about 4 MB resident) for TLS
streams, which the agent never opens: its TLS to istiod is gRPC's own. import_asyncio()
imports asyncio with ssl hidden; the first `import ssl` anywhere afterwards loads ssl as
usual and then hands it to asyncio, so asyncio's TLS works as it did. ssl_deferred() does
the like for modules that read a few of ssl's constants while they are imported
(prometheus_client's exposition, http.client), and hashlib_deferred() for hashlib
(libcrypto's digests) under imports that only bind it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Final

# asyncio's modules that bind ssl when they are imported (CPython 3.11).
_ASYNCIO_SSL_USERS = ("asyncio.base_events", "asyncio.selector_events")


class _TLSVersion:
    """Stands for ssl.TLSVersion in annotations."""


class _SSLContext:
    """Stands for ssl.SSLContext in annotations."""


# What modules imported under ssl_deferred() read of ssl while they are imported
# (prometheus_client's exposition: default arguments and annotations of its TLS helpers).
# The constants are ssl's own values (CPython's _ssl constants; a test compares them).
_IMPORT_TIME_NAMES: Final = {
    "PROTOCOL_TLS_CLIENT": 16,
    "PROTOCOL_TLS_SERVER": 17,
    "TLSVersion": _TLSVersion,
    "SSLContext": _SSLContext,
}


class _SslStandIn(ModuleType):
    """ssl, for the modules imported under ssl_deferred(). While they are imported it
    carries the names they read then (_IMPORT_TIME_NAMES); any other name, and every
    name afterwards, loads ssl (which then replaces this object in every module that
    bound it) and is ssl's own."""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get("ssl") is self:
            del sys.modules["ssl"]  # needed while importing after all: the real one
        return getattr(importlib.import_module("ssl"), name)


_STAND_IN: Final = _SslStandIn("ssl", "ssl, until the first use of a name")
_stand_in_users: set[str] = set()  # modules whose global `ssl` is _STAND_IN


def _hand_over(ssl: ModuleType) -> None:
    for name in sorted(_stand_in_users):
        module = sys.modules.get(name)
        if module is not None and vars(module).get("ssl") is _STAND_IN:
            vars(module)["ssl"] = ssl
    _stand_in_users.clear()
    for name in _ASYNCIO_SSL_USERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "ssl", False) is None:
            vars(module)["ssl"] = ssl
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and getattr(sslproto, "ssl", False) is None:
        # Run again: it defines some names (SSLAgainErrors) only when ssl exists.
        importlib.reload(sslproto)


class _ThenHandOver(importlib.abc.Loader):
    """ssl's own loader, then _hand_over."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _hand_over(module)


class _SslFinder(importlib.abc.MetaPathFinder):
    """Finds ssl as the other finders do, once, with a loader that hands it to asyncio."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "ssl":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenHandOver(spec.loader)
        return spec


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Finds the named modules as the other finders do, with importlib's LazyLoader: each
    runs on its first attribute access instead of at its import."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        self._finding = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self._names or self._finding:
            return None
        self._finding = True  # find_spec below asks sys.meta_path again: not this finder
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


@contextlib.contextmanager
def hashlib_deferred() -> Iterator[None]:
    """Imports inside it that bind hashlib get it unloaded until its first use.

    hashlib loads _hashlib, OpenSSL's digests (about 0.6 MB resident, even with ssl
    loaded); urllib.request imports it for HTTP digest auth only. A no-op once hashlib is
    loaded.
    """
    finder = _LazyFinder(frozenset({"hashlib"}) - sys.modules.keys())
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def _watch_for_ssl() -> None:
    """The next `import ssl` loads ssl and hands it over (once; a no-op if one waits)."""
    if not any(isinstance(f, _SslFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SslFinder())


def _binds_stand_in(module: object) -> bool:
    try:
        # Not getattr: that would run a module LazyLoader holds back (hashlib_deferred).
        namespace = object.__getattribute__(module, "__dict__")
    except AttributeError:
        return False
    return namespace.get("ssl") is _STAND_IN


@contextlib.contextmanager
def ssl_deferred() -> Iterator[None]:
    """Imports inside it get a stand-in for ssl until something uses ssl for real.

    ssl loads libssl and libcrypto (about 4 MB resident); prometheus_client's exposition
    module and http.client (under http.server) import it for TLS features the agent
    never uses (HTTPS clients, a TLS metrics server). The first `import ssl` afterwards,
    or the first use of a name the stand-in does not carry, loads ssl and puts it in
    place of the stand-in in every module that bound it. A no-op once ssl is loaded.
    """
    if "ssl" in sys.modules:
        yield
        return
    sys.modules["ssl"] = _STAND_IN
    vars(_STAND_IN).update(_IMPORT_TIME_NAMES)
    try:
        yield
    finally:
        for name in _IMPORT_TIME_NAMES:
            vars(_STAND_IN).pop(name, None)
        if sys.modules.get("ssl") is _STAND_IN:
            del sys.modules["ssl"]
        _stand_in_users.update(
            name for name, module in list(sys.modules.items()) if _binds_stand_in(module)
        )
        real = sys.modules.get("ssl")
        if real is not None:
            _hand_over(real)
        else:
            _watch_for_ssl()


def import_asyncio() -> None:
    """Import asyncio without ssl, unless either is loaded already (then nothing to save)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # asyncio: "ssl = None"
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    _watch_for_ssl()
