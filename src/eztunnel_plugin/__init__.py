"""eztunnel-plugin: in-kernel socket splicing for Istio ambient, beside ztunnel."""

__version__ = "0.1.0"
