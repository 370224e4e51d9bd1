"""One exception root for vmrepl, with a subclass per area.

Each class names the gRPC status it maps to; `vmrepl.rpc` is the one place
that turns these into gRPC errors.
"""

from __future__ import annotations

from typing import ClassVar


class VmreplError(Exception):
    """Root of every error vmrepl raises on purpose."""

    grpc_code: ClassVar[str] = "INTERNAL"


class ConfigError(VmreplError):
    """A configuration file or environment override is invalid."""

    grpc_code = "FAILED_PRECONDITION"


class InvalidArgument(VmreplError):
    """A request field is missing or out of range."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message  # what is wrong with it, without the field's name


class NotFound(VmreplError):
    grpc_code = "NOT_FOUND"


class AlreadyExists(VmreplError):
    grpc_code = "ALREADY_EXISTS"


class ResourceExhausted(VmreplError):
    grpc_code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(VmreplError):
    grpc_code = "FAILED_PRECONDITION"


class Unavailable(VmreplError):
    """Something the call needs (an agent the controller relays to) cannot be reached now; try again later."""

    grpc_code = "UNAVAILABLE"


class DeadlineExceeded(VmreplError):
    """A peer stayed silent for longer than it may (a stream that never opens, or stops sending)."""

    grpc_code = "DEADLINE_EXCEEDED"


class PathError(InvalidArgument):
    """A path would leave the datastore or source roots."""


class BatchError(InvalidArgument):
    """A Transfer frame or batch header is malformed or out of sequence."""


class ChecksumMismatch(VmreplError):
    """A data extent's bytes do not match the digest sent with them."""

    grpc_code = "DATA_LOSS"


class DiskError(VmreplError):
    """Reading or writing a disk image failed."""

    grpc_code = "INTERNAL"


class UnsupportedDisk(DiskError):
    """The disk image is of a kind or in a state vmrepl refuses to read."""

    grpc_code = "FAILED_PRECONDITION"


class SecurityError(VmreplError):
    grpc_code = "PERMISSION_DENIED"


class TicketError(SecurityError):
    """A transfer ticket is forged, expired or for something else."""


class PeerNotAllowed(SecurityError):
    """The caller's certificate does not carry a role allowed for the call."""


class TransferError(VmreplError):
    """A disk transfer failed for good (not a break it can resume from)."""

    grpc_code = "ABORTED"


class TransferCancelled(TransferError):
    grpc_code = "CANCELLED"


class HostError(VmreplError):
    """A hypervisor host refused or failed an operation and said why (a cmdlet's error, a WMI return code).

    FAILED_PRECONDITION: the host's state (access, a busy VM, a missing checkpoint) must change before the
    same call can succeed; retrying blindly does not help.
    """

    grpc_code = "FAILED_PRECONDITION"

    def __init__(self, *, host: str, operation: str, message: str, code: int | None) -> None:
        where = f"{host}: {operation}"
        super().__init__(f"{where}: {message}" + (f" (return code {code})" if code is not None else ""))
        self.host = host
        self.operation = operation
        self.description = message
        self.code = code


class HostOutputError(VmreplError):
    """A host script printed something other than exactly one valid envelope.

    INTERNAL: the shipped script and this reader disagree (a bug, or a host that is not what it claims);
    the output is refused rather than guessed at.
    """

    grpc_code = "INTERNAL"


class HostUnreachable(Unavailable):
    """A hypervisor host could not be reached (connection refused, no route, a timeout, a broken reply).

    UNAVAILABLE: the host or the network may come back; the same call may succeed later.
    """


class HostTrustError(VmreplError):
    """A hypervisor host's TLS certificate is not trusted by the configured CA bundle (or the system's).

    FAILED_PRECONDITION: the host's settings (its CA bundle) or its certificate must change first.
    """

    grpc_code = "FAILED_PRECONDITION"


class HostAuthError(VmreplError):
    """A hypervisor host refused the credentials it was given (WinRM answered 401).

    FAILED_PRECONDITION: the host's credential (or the account's rights on the host) must change first;
    the caller's own permissions are not in question, so not PERMISSION_DENIED.
    """

    grpc_code = "FAILED_PRECONDITION"
