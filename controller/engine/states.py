"""Session and task states, their legal transitions, and the decisions taken from them. Pure.

The states themselves are the values the database stores (controller.db.enums).
The engine records every transition in the database *before* acting on it;
after a crash it reads these states back and `reconcile_task` says what to
do with each task.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.db.enums import SessionState, TaskState, VmState
from vmrepl.domain import ChangeMode, ChangeTracking
from vmrepl.providers.base import CheckpointRequest

TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.STARTING, TaskState.FAILED, TaskState.RESUMABLE}),
    # STARTING again: the start is re-sent after a restart found the proxy without the transfer.
    TaskState.STARTING: frozenset(
        {TaskState.STARTING, TaskState.RUNNING, TaskState.FAILED, TaskState.RESUMABLE, TaskState.PENDING}
    ),
    TaskState.RUNNING: frozenset({TaskState.STARTING, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.RESUMABLE}),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.RESUMABLE: frozenset(),
    TaskState.FAILED: frozenset(),
}
TERMINAL_TASK = frozenset({TaskState.SUCCEEDED, TaskState.RESUMABLE, TaskState.FAILED})
# A session in these states has work left (a job has at most one); a tuple, for SQL's IN.
ACTIVE_SESSION = (SessionState.RUNNING, SessionState.STOPPING)


class IllegalTransition(ValueError):
    pass


def check_task_transition(old: TaskState, new: TaskState) -> TaskState:
    if new not in TASK_TRANSITIONS[old]:
        raise IllegalTransition(f"a task cannot go from {old} to {new}")
    return new


def session_outcome(tasks: Iterable[TaskState], *, stopped: bool) -> SessionState:
    """The session's end state once every task is terminal.

    A stop makes a session incomplete only by what it left undone (disks left resumable, or nothing
    planned at all): a stop that came after every disk succeeded found the work done, and the session
    succeeded. (A VM stopped before its checkpoint ends its tasks resumable; the caller also checks the
    VMs, whose restore points come after their disks.)"""
    states = list(tasks)
    if any(t not in TERMINAL_TASK for t in states):
        raise IllegalTransition("a session ends only when every task has")
    if any(t is TaskState.FAILED for t in states):
        return SessionState.FAILED
    if any(t is TaskState.RESUMABLE for t in states) or (stopped and not states):
        return SessionState.INCOMPLETE
    return SessionState.SUCCEEDED


def vm_restore_point_due(tasks: Iterable[TaskState]) -> bool:
    """A VM gets a restore point only when every one of its disks succeeded."""
    states = list(tasks)
    return bool(states) and all(t is TaskState.SUCCEEDED for t in states)


class DiskStart(enum.StrEnum):
    RESUME = "resume"  # same checkpoint, the target resumes from its committed offset
    FRESH = "fresh"  # new checkpoint; changed ranges or digest comparison as the job says
    COMPARE = "compare"  # new checkpoint, digest comparison: the replica may hold a torn transfer
    # Completed from this same (held) checkpoint in the earlier session: it must complete again for this
    # session's restore point, and only blocks changed since the checkpoint itself travel, which is none.
    DONE = "done"


@dataclass(frozen=True, slots=True)
class HeldCheckpointView:
    checkpoint_id: str
    deadline: dt.datetime
    resumable_disks: frozenset[str]
    done_disks: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class VmPlan:
    # Keep using this checkpoint for the resumed disks; None: a new one is taken, after the held one (past
    # its deadline) is released (the VM's PLANNED step reads the held record again, see session.py).
    reuse_checkpoint: str | None
    disks: dict[str, DiskStart]


def plan_vm(disk_ids: Iterable[str], held: HeldCheckpointView | None, *, now: dt.datetime) -> VmPlan:
    """How the next session starts each disk of a VM, given a checkpoint held from an earlier one.

    Before the deadline the held checkpoint is reused: its unfinished disks resume, the others start
    afresh from it. After the deadline it is released and the unfinished disks are re-run against a
    new checkpoint by digest comparison, never by appending to a torn replica.
    """
    disks = list(disk_ids)
    if held is None:
        return VmPlan(None, dict.fromkeys(disks, DiskStart.FRESH))
    if now < held.deadline:
        plan = {d: _reuse_start(d, held) for d in disks}
        return VmPlan(held.checkpoint_id, plan)
    plan = {d: DiskStart.COMPARE if d in held.resumable_disks else DiskStart.FRESH for d in disks}
    return VmPlan(None, plan)


def _reuse_start(disk_id: str, held: HeldCheckpointView) -> DiskStart:
    if disk_id in held.resumable_disks:
        return DiskStart.RESUME
    return DiskStart.DONE if disk_id in held.done_disks else DiskStart.FRESH


FINAL_VM = frozenset({VmState.DONE, VmState.HELD, VmState.STOPPED, VmState.FAILED})


def vm_after_transfers(tasks: Iterable[TaskState]) -> VmState:
    """Where a VM goes once all its disk tasks ended: a restore point only if every disk succeeded; the
    checkpoint kept if any disk can resume; otherwise released (the VM failed)."""
    states = list(tasks)
    if vm_restore_point_due(states):
        return VmState.COMMITTING
    if any(t is TaskState.RESUMABLE for t in states):
        return VmState.HOLDING
    return VmState.RELEASING


def replica_session_end(state: VmState, *, wrote: bool) -> bool | None:
    """How a VM's session ended, as the target is told (EndReplicaSession's keep_for_resume), once the VM
    is final and will not be retried; None when there is nothing to tell.

    DONE: the commit told it (the replica is at the new point). A session that never prepared a disk of
    the VM (`wrote` false) has no writes there, and may find the replica kept for an earlier session whose
    checkpoint is still held: nothing of its own to end. HELD: the controller holds the checkpoint and the
    next session continues the writes from it, so the target keeps them (True). FAILED or STOPPED: no
    session continues them, so the target rolls the replica back to its newest point now (False)."""
    if state not in FINAL_VM:
        raise IllegalTransition(f"a VM in {state} has not ended")
    if state is VmState.DONE or not wrote:
        return None
    return state is VmState.HELD


@dataclass(frozen=True, slots=True)
class ChangeChoice:
    mode: ChangeMode
    since: str = ""
    # A COMPARE standing in for RANGES since `since`: a periodic full check (see full_check_due).
    full_check: bool = False


def full_check_due(*, every: int, requested: bool, recent: Sequence[bool]) -> bool:
    """Whether a VM's incremental in this session is a full check: every block's digest compared instead of
    trusting the host's changed ranges, so writes the change tracking missed are found within `every`
    sessions.

    `recent` holds the VM's latest earlier sessions of the job that made a restore point, newest first (at
    least `every` - 1 of them when it has that many): for each, whether it compared every block of every
    disk (a full read, a digest comparison, or a re-run after a failed sample). Sessions that made no restore
    point do not count: they left the replica at the last point. `every` 0 never checks; 1 checks every
    session; otherwise a check comes when the last `every` - 1 sessions compared nothing. A session asked
    for one (`requested`, StartJob's full_check) is a check whatever the count."""
    if requested:
        return True
    if every <= 0:
        return False
    since = next((i for i, compared in enumerate(recent) if compared), len(recent))
    return since >= every - 1


def choose_change(
    start: DiskStart,
    *,
    tracking: ChangeTracking,
    last_point_reference: str | None,
    checkpoint_reference: str,
    full_check: bool = False,
) -> ChangeChoice:
    """The change source of a disk starting afresh (a resumed one reuses its earlier choice).

    `tracking` is the job's setting (on, off, auto); `last_point_reference` the change-tracking
    reference of the VM's newest restore point, None without one. A RANGES choice can still fall
    back to COMPARE when the provider cannot report changes since that reference. `full_check`
    (full_check_due): a disk that would use RANGES compares digests instead, remembering the reference
    so the host's ranges can still tell repaired blocks from changes."""
    if start is DiskStart.COMPARE or (tracking is ChangeTracking.OFF and last_point_reference is not None):
        return ChangeChoice(ChangeMode.COMPARE)
    if start is DiskStart.DONE:
        return ChangeChoice(ChangeMode.RANGES, checkpoint_reference)
    if last_point_reference is None:
        return ChangeChoice(ChangeMode.FULL)
    if not last_point_reference:
        return ChangeChoice(ChangeMode.COMPARE)
    if full_check:
        return ChangeChoice(ChangeMode.COMPARE, last_point_reference, full_check=True)
    return ChangeChoice(ChangeMode.RANGES, last_point_reference)


class Recovery(enum.StrEnum):
    REATTACH = "reattach"  # the proxy still runs it: watch it again
    RESUME = "resume"  # start it again; the target resumes from its committed offset
    KEEP = "keep"  # terminal already: nothing to do


def reconcile_task(state: TaskState, *, proxy_knows_transfer: bool | None) -> Recovery:
    """After a controller restart: what to do with a task found in `state`.

    `proxy_knows_transfer` is whether the recorded proxy still reports the transfer (by its
    controller-chosen id) as running; None: the proxy cannot be asked."""
    if state in TERMINAL_TASK:
        return Recovery.KEEP
    if state in (TaskState.STARTING, TaskState.RUNNING) and proxy_knows_transfer:
        return Recovery.REATTACH
    # PENDING, STARTING that never reached the proxy, or RUNNING on a proxy that lost it (restarted):
    # starting again is safe because the target resumes from what it made durable, and a start that
    # did arrive is recognised by its controller-chosen transfer id.
    return Recovery.RESUME


def checkpoint_request(guest_processing: Mapping[str, object]) -> CheckpointRequest:
    """The checkpoint a job's guest-processing settings ask for: application-consistent when enabled, with a
    crash-consistent fallback only when failures are to be ignored (GuestProcessing in controller.proto)."""
    enabled = guest_processing.get("enabled") is True
    return CheckpointRequest(
        application=enabled, required=enabled and guest_processing.get("ignore_failures") is not True
    )
