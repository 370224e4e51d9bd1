"""What the session engine's parts share while a session runs: clients, slots, live progress, the guest hook."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519

from controller.engine.agents import READY_WITHIN_SECONDS, Agents
from controller.engine.journal import Journal
from controller.engine.providers import Providers
from controller.engine.slots import SlotBoard
from vmrepl.domain import ChangeTracking, Compression, DiskFormat
from vmrepl.errors import FailedPrecondition, PathError
from vmrepl.names import check_name
from vmrepl.providers.base import Provider, VmInfo
from vmrepl.v1 import proxy_pb2


class GuestProcessing(Protocol):
    """Application-aware processing around the checkpoint (the Hyper-V work fills it: WinRM to the guest,
    runtime components, VSS). Called with the job's guest_processing settings."""

    async def before_checkpoint(self, vm: VmInfo, settings: dict[str, object]) -> bool:
        """Whether the guest's applications are quiesced for the checkpoint taken next: the restore
        point is then application-consistent, otherwise crash-consistent."""
        ...

    async def after_checkpoint(self, vm: VmInfo, settings: dict[str, object]) -> None: ...


class NoGuestProcessing:
    """Crash-consistent checkpoints only: what the file-backed provider offers."""

    async def before_checkpoint(self, vm: VmInfo, settings: dict[str, object]) -> bool:
        return False

    async def after_checkpoint(self, vm: VmInfo, settings: dict[str, object]) -> None:
        return None


class LiveProgress:
    """The newest TransferProgress of each running task, for WatchSession; never persisted as state."""

    def __init__(self) -> None:
        self._tasks: dict[str, dict[str, proxy_pb2.TransferProgress]] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def update(self, session_id: str, task_id: str, progress: proxy_pb2.TransferProgress) -> None:
        self._tasks.setdefault(session_id, {})[task_id] = progress
        self.poke(session_id)

    def poke(self, session_id: str) -> None:
        event = self._changed.pop(session_id, None)
        if event is not None:
            event.set()

    def get(self, session_id: str) -> dict[str, proxy_pb2.TransferProgress]:
        return dict(self._tasks.get(session_id, {}))

    async def wait(self, session_id: str, seconds: float) -> None:
        event = self._changed.setdefault(session_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    def forget(self, session_id: str) -> None:
        self._tasks.pop(session_id, None)
        self.poke(session_id)


@dataclass(kw_only=True)
class EngineParts:
    journal: Journal
    agents: Agents
    slots: SlotBoard
    signing_key: ed25519.Ed25519PrivateKey
    live: LiveProgress = field(default_factory=LiveProgress)
    # How long an unreachable proxy's transfer is waited for before the task is left resumable.
    proxy_lost_after: float = 60.0
    # How long a target call that finds the target out of reach (restarting) is asked again.
    target_retry_seconds: float = READY_WITHIN_SECONDS
    guest: GuestProcessing = field(default_factory=NoGuestProcessing)
    # The provider of each host (credentials unsealed with the controller's keys).
    providers: Providers = field(default_factory=lambda: Providers(None))
    _checkpoint_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def checkpoint_lock(self, vm_id: str) -> asyncio.Lock:
        """Orders checkpoint scans and creations of one VM across the sessions of this controller."""
        return self._checkpoint_locks.setdefault(vm_id, asyncio.Lock())


@dataclass(frozen=True, kw_only=True)
class TargetView:
    target_id: str
    name: str  # the target agent's configured name: the audience of its tickets
    address: str
    tls_server_name: str
    max_tasks: int


@dataclass(frozen=True, kw_only=True)
class JobView:
    """The job's settings as the session read them when it started."""

    job_id: str
    name: str
    host_id: str
    replica_root: str
    restore_points_to_keep: int
    compression: Compression
    block_size: int
    bandwidth_limit_mbps: float
    change_tracking: ChangeTracking
    guest_processing: dict[str, object]
    checkpoint_hold_seconds: int
    retries: int = 0
    retry_wait_seconds: int = 0
    # Every this many sessions of a VM, a full check (states.full_check_due); 0: never.
    full_check_every: int = 0
    # The replica disks' format, the job's setting resolved for its host (vmrepl.domain.replica_format).
    replica_format: DiskFormat = DiskFormat.RAW


@dataclass(kw_only=True)
class SessionContext:
    session_id: str
    job: JobView
    target: TargetView
    provider: Provider
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Started with StartJob's full_check: every VM's incremental is a full check.
    full_check: bool = False

    def replica_path(self, vm_id: str) -> str:
        return f"{self.job.replica_root}/{replica_folder(vm_id)}"


def replica_folder(vm_id: str) -> str:
    """A VM's folder under its job's replica root: its id, as one plain name. An id with a '/' would nest
    one VM's replica inside another's folder (or another job's), and '.' or '..' would leave the root."""
    try:
        return check_name("vm_id", vm_id)
    except PathError as e:
        raise FailedPrecondition(
            f"VM id {vm_id!r} cannot name a replica folder (one name of letters, digits, '.', '_', '-'; up to 128)"
        ) from e
