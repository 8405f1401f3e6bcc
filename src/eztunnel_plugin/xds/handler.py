"""What the xDS client hands decoded resources to (ztunnel's `Handler` trait).

One handler per resource type. The client decodes every resource of a response into
a record (xds.decode), drops the ones that fail, and calls handle() once with the rest
and the removed names; the handler applies them as one step and returns the names it
refused with a reason. The client NACKs decode failures and refusals together and
accepts the rest (partial acceptance), and keeps the accepted versions itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import NamedTuple, Protocol, TypeVar

R_contra = TypeVar("R_contra", contravariant=True)


class Rejection(NamedTuple):
    """A resource that was not applied; reason goes into the NACK."""

    name: str
    reason: str


class Handler(Protocol[R_contra]):
    def handle(self, updates: Mapping[str, R_contra], removals: Set[str]) -> Sequence[Rejection]:
        """Apply updates (name -> record) and removals (names, none of them in updates).

        A refused update keeps whatever the handler held for that name before.
        """
        ...

    def synced(self) -> None:
        """The first response of this type on a stream has been handled: the handler
        now holds the server's whole view of it (called once per stream)."""
        ...
