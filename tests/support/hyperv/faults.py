"""Scripted faults for the Hyper-V host model: what a test asks the host to do wrong, and how many times.

Method names are the WMI methods the scripts call: "CreateSnapshot", "DestroySnapshot",
"ConvertToReferencePoint" (Msvm_VirtualSystemSnapshotService), "DestroyReferencePoint"
(Msvm_VirtualSystemReferencePointService), "GetVirtualDiskChanges", "CreateVirtualHardDisk",
"MergeVirtualHardDisk" (Msvm_ImageManagementService), "RequestStateChange" (Msvm_ComputerSystem),
"InitiateShutdown" (Msvm_ShutdownComponent), "DestroySystem" (Msvm_VirtualSystemManagementService).
`times` is how many calls the fault applies to; None is every call until `HyperVHost.clear_faults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Method = Literal[
    "CreateSnapshot",
    "DestroySnapshot",
    "ConvertToReferencePoint",
    "DestroyReferencePoint",
    "GetVirtualDiskChanges",
    "CreateVirtualHardDisk",
    "MergeVirtualHardDisk",
    "RequestStateChange",
    "InitiateShutdown",
    "DestroySystem",
]
METHODS: tuple[Method, ...] = (
    "CreateSnapshot",
    "DestroySnapshot",
    "ConvertToReferencePoint",
    "DestroyReferencePoint",
    "GetVirtualDiskChanges",
    "CreateVirtualHardDisk",
    "MergeVirtualHardDisk",
    "RequestStateChange",
    "InitiateShutdown",
    "DestroySystem",
)

ACCESS_DENIED = 32769
NOT_SUPPORTED = 32770
SYSTEM_IN_USE = 32774
INVALID_STATE = 32775


@dataclass(frozen=True)
class ReturnCode:
    """The method returns `code` at once, no job: 32769 access denied, 32774 system in use, 32775 invalid
    state (a VM busy with another operation)."""

    method: Method
    code: int
    times: int | None = 1


@dataclass(frozen=True)
class JobFails:
    """The method returns 4096; its job ends in JobState 10 (Exception) with this ErrorCode and text."""

    method: Method
    error_code: int = 32768
    description: str = "The operation failed."
    times: int | None = 1


@dataclass(frozen=True)
class JobHangs:
    """The method returns 4096; its job stays Running (4) forever: the script's timeout ends the wait."""

    method: Method
    times: int | None = 1


@dataclass(frozen=True)
class SlowJob:
    """The method returns 4096; its job runs `seconds` of wall time before it completes."""

    method: Method
    seconds: float
    times: int | None = 1


@dataclass(frozen=True)
class Stall:
    """GetVirtualDiskChanges returns 0 with ProcessedByteLength 0 and no ranges."""

    times: int | None = 1
    method: Method = "GetVirtualDiskChanges"


Fault = ReturnCode | JobFails | JobHangs | SlowJob | Stall


def access_denied(method: Method, times: int | None = 1) -> ReturnCode:
    return ReturnCode(method, ACCESS_DENIED, times)


def vm_busy(method: Method, code: Literal[32774, 32775] = 32775, times: int | None = 1) -> ReturnCode:
    return ReturnCode(method, code, times)


def from_json(doc: dict[str, object]) -> Fault:
    """A fault from its JSON form (the serve process's control endpoint): {"kind": "ReturnCode", ...fields}."""
    kinds: dict[str, type[Fault]] = {c.__name__: c for c in (ReturnCode, JobFails, JobHangs, SlowJob, Stall)}
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(kinds)}")
    fields = {k: v for k, v in doc.items() if k != "kind"}
    method = fields.get("method", "GetVirtualDiskChanges")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    return kinds[kind](**fields)  # type: ignore[arg-type]
