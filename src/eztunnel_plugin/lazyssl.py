"""asyncio without ssl until something imports ssl.

asyncio imports ssl at import time (libssl and libcrypto: about 4 MB resident) for TLS
streams, which the agent never opens: its TLS to istiod is gRPC's own. import_asyncio()
imports asyncio with ssl hidden; the first `import ssl` anywhere afterwards loads ssl as
usual and then hands it to asyncio, so asyncio's TLS works as it did. hashlib_deferred()
does the like for hashlib (libcrypto's digests) under imports that only bind it.
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

# asyncio's modules that bind ssl when they are imported (CPython 3.11).
_ASYNCIO_SSL_USERS = ("asyncio.base_events", "asyncio.selector_events")


def _hand_over(ssl: ModuleType) -> None:
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


def import_asyncio() -> None:
    """Import asyncio without ssl, unless either is loaded already (then nothing to save)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # asyncio: "ssl = None"
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    sys.meta_path.insert(0, _SslFinder())
