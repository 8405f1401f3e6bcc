"""eztunnel-plugin: in-kernel socket splicing for Istio ambient, beside ztunnel."""

# The one source of the version: pyproject.toml reads it from here (setuptools
# dynamic attr), cheaper at start than importlib.metadata's parser.
__version__ = "0.1.0"

# Before any module of the package imports asyncio: asyncio without ssl, ~4 MB resident
# the agent never uses, until something imports ssl (lazyssl.py).
from eztunnel_plugin import lazyssl

lazyssl.import_asyncio()
