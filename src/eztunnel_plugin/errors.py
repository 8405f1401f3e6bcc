"""Every exception the agent raises, in one place.

All derive from EztunnelError. Those that also are an OSError or a ValueError keep
that base, so callers that catch the built-in kind go on catching them. This module
imports nothing of the package: any module may raise these without an import cycle.
"""

from __future__ import annotations


class EztunnelError(Exception):
    """The base of every exception of the agent."""


class ConfigError(EztunnelError, ValueError):
    """A bad or missing `run` setting; the message starts with the setting's name."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


class EndpointsFileError(EztunnelError, ValueError):
    """The static endpoints file cannot be used; the message says why, on one line."""


class BpfError(EztunnelError, OSError):
    """A bpf(2) call failed; carries errno and what we tried to do."""


class LoadError(EztunnelError):
    """libbpf could not open or load the object; carries libbpf's own explanation."""


class DataplaneError(EztunnelError):
    """The BPF data plane cannot be installed, reused or changed as asked."""


class Rejected(EztunnelError):
    """A resource failed validation; the message is the NACK reason."""


class ConnectError(EztunnelError):
    """Could not bring the channel up (refused, TLS failure, timeout, no token)."""


class ProtocolError(EztunnelError):
    """The server broke the protocol (an oversize nonce, ...): drop the stream, back off."""


class AdminSocketError(EztunnelError, OSError):
    """The admin socket cannot be set up; the message says why, on one line."""


class ReaderBusy(EztunnelError):
    """Too many map reads are already waiting for the API's reader thread."""


class CheckFailed(EztunnelError):
    """A kernel self-test check found the kernel misbehaving; the message says how."""


class RequestRefused(EztunnelError):
    """An HTTP request the metrics endpoint answers with `status` and nothing else."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
