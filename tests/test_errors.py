"""The agent's exceptions: one base, and the built-in kinds callers catch kept."""

from __future__ import annotations

import errno

import pytest

from eztunnel_plugin import errors


def test_a_config_error_names_its_setting() -> None:
    e = errors.ConfigError("--grpc-listen", "expected HOST:PORT, got 'x'")
    assert str(e) == "--grpc-listen: expected HOST:PORT, got 'x'"
    assert e.setting == "--grpc-listen"
    assert isinstance(e, ValueError) and isinstance(e, errors.EztunnelError)


def test_a_bpf_error_is_an_oserror_with_its_errno() -> None:
    e = errors.BpfError(errno.ENOSPC, "map lookup batch: No space left on device")
    assert e.errno == errno.ENOSPC and isinstance(e, OSError)
    with pytest.raises(OSError, match="No space left"):
        raise e


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.AdminSocketError, OSError),  # `run` reports any OSError on one line
        (errors.EndpointsFileError, ValueError),
        (errors.ConfigError, ValueError),
    ],
)
def test_builtin_kinds_are_kept(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, builtin) and issubclass(cls, errors.EztunnelError)


def test_the_rest_are_only_ours() -> None:
    for cls in (errors.DataplaneError, errors.LoadError, errors.Rejected, errors.ConnectError,
                errors.ProtocolError, errors.ReaderBusy):  # fmt: skip
        assert cls.__bases__ == (errors.EztunnelError,), cls
        assert not issubclass(cls, (OSError, ValueError))


def test_a_refused_request_carries_its_http_status() -> None:
    e = errors.RequestRefused(431)
    assert e.status == 431 and isinstance(e, errors.EztunnelError)


def test_one_except_catches_every_error_of_the_agent() -> None:
    raised = [errors.ConfigError("x", "y"), errors.BpfError(1, "z"), errors.Rejected("r")]
    for e in raised:
        with pytest.raises(errors.EztunnelError):
            raise e
