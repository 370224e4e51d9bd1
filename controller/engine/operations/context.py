"""What an operation's steps work with: the job's parts as the session read them, and the two outside
services the engine lends them (a replication session of one VM, the reverse transfer of a failback),
each behind a small typed interface so tests put fakes in their place."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.engine.agents import TargetClient
from controller.engine.operations.plans import Operation
from controller.engine.runtime import TargetView
from vmrepl.domain import DiskFormat
from vmrepl.providers.base import NetworkMap, Provider


class Replicator(Protocol):
    """Starts a replication session (controller.engine.sessions.Engine): a planned failover's last
    incremental replicates one VM only."""

    async def start_replication(self, job_id: str, *, only_vms: Sequence[str]) -> str:
        """The new session's id (FailedPrecondition when the job has a session running)."""
        ...


@dataclass(frozen=True, kw_only=True)
class ReverseRequest:
    """A failback's transfer: the failed-over VM's disks (read on the failover host through a checkpoint of it)
    written onto the original VM's disks by the failback target, only blocks whose digests differ."""

    session_id: str  # the operation session: the transfer's tasks are recorded under it
    job_id: str
    vm_id: str  # the original VM, as the job knows it
    vm_name: str
    source_host_id: str  # the failover host, and its provider
    source: Provider
    source_vm_id: str  # the failed-over VM there
    target: TargetView  # the failback target (next to the original host)
    replica_path: str  # `.failback/<job id>/<vm id>`, prepared per disk with PrepareFailbackDisk
    # (disk id, the original disk's path as the failback target sees it, its format) per disk.
    original_disks: tuple[tuple[str, str, DiskFormat], ...]
    block_size: int
    # A failback to a new location: each `original_disks` path is a new, empty image the failback target
    # creates (PrepareFailbackDisk create, of the failed-over VM's disk size); undone, it removes them.
    create: bool = False


@dataclass(frozen=True, slots=True)
class ReverseFigures:
    bytes_read: int = 0
    bytes_sent: int = 0
    blocks_differing: int = 0


class ReverseTransfer(Protocol):
    """controller/engine/reverse.py (the failback work) satisfies this. Every call is idempotent: after a
    crash the same request continues (`transfer` resumes its tasks) or undoes (`roll_back`)."""

    async def transfer(self, request: ReverseRequest) -> ReverseFigures:
        """Prepares the failback disks, runs the transfer and commits it on the failback target: on return the
        original disks hold the failed-over VM's data, the originals' old blocks still kept for a rollback."""
        ...

    async def roll_back(self, request: ReverseRequest) -> None:
        """RollbackReplica of the failback folder (the original disks back as they were), then DeleteReplica."""
        ...

    async def finish(self, request: ReverseRequest) -> None:
        """DeleteReplica of the failback folder once the failback is kept (the original disks stay)."""
        ...

    async def discard(self, request: ReverseRequest) -> None:
        """A failback to a new location undone: the failback folder deleted with the images it created."""
        ...


class NoReverseTransfer:
    """Until a reverse transfer is wired in: failback refused before any change."""

    async def transfer(self, request: ReverseRequest) -> ReverseFigures:
        from vmrepl.errors import FailedPrecondition

        raise FailedPrecondition("this controller has no failback transfer")

    async def roll_back(self, request: ReverseRequest) -> None:
        return None

    async def finish(self, request: ReverseRequest) -> None:
        return None

    async def discard(self, request: ReverseRequest) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class HostView:
    """A host an operation works on besides the job's own (a failback's new location)."""

    host_id: str
    name: str
    provider_kind: str
    # A file host's folder (as the host, the proxies and the failback target name it).
    address: str
    provider: Provider


HostLookup = Callable[[str], Awaitable[HostView]]


@dataclass(frozen=True, kw_only=True)
class OperationRequest:
    """StartReplicaOperation's settings, kept as the session's `request` JSON."""

    point: str = ""
    time_limit_seconds: int = 0
    test_id: str = ""
    replicate_back_job: str = ""
    failback_host: str = ""

    def json(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "time_limit_seconds": self.time_limit_seconds,
            "test_id": self.test_id,
            "replicate_back_job": self.replicate_back_job,
            "failback_host": self.failback_host,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OperationRequest:
        return cls(
            point=str(d.get("point", "")),
            time_limit_seconds=int(d.get("time_limit_seconds", 0)),
            test_id=str(d.get("test_id", "")),
            replicate_back_job=str(d.get("replicate_back_job", "")),
            failback_host=str(d.get("failback_host", "")),
        )


@dataclass(kw_only=True)
class OperationContext:
    """One operation session as its steps see it (read once when it starts or continues)."""

    session_id: str
    started_at: dt.datetime
    operation: Operation
    request: OperationRequest
    job_id: str
    job_name: str
    replica_root: str
    block_size: int
    target: TargetView
    target_client: TargetClient
    source_host_id: str
    source: Provider
    failover_host_id: str = ""
    failover_provider_kind: str = ""
    failover: Provider | None = None
    networks: tuple[NetworkMap, ...] = ()
    failback_target: TargetView | None = None
    replicator: Replicator | None = None
    reverse: ReverseTransfer = field(default_factory=NoReverseTransfer)
    # Any host by id (a failback's new location); None: no such host can be asked.
    hosts: HostLookup | None = None
    # How long a source VM's clean shutdown may take (planned failover, failback's failed-over VM).
    shutdown_seconds: float = 300.0
    # How often a planned failover's last incremental is looked at.
    poll_seconds: float = 0.5
