"""The states the database stores, as enums: the columns hold their values (controller.db.types.state_type)
and hand back members, so code compares members, never strings. Pure: the rules over them (legal
transitions, outcomes) are in controller.engine.states.
"""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    PENDING = "pending"  # planned, no proxy yet
    STARTING = "starting"  # a StartDiskTransfer is being sent (the proxy may or may not have it)
    RUNNING = "running"  # the proxy is streaming (transfer_id recorded)
    SUCCEEDED = "succeeded"
    RESUMABLE = "resumable"  # stopped with a committed offset, checkpoint held: the next run resumes it
    FAILED = "failed"


class SessionState(enum.StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    INCOMPLETE = "incomplete"  # some disks left resumable (stopped, window closed)
    FAILED = "failed"


class VmState(enum.StrEnum):
    """One VM in one session; each state names the next action, taken after the state is written."""

    PLANNED = "planned"  # next: release a held checkpoint past its deadline, then take a checkpoint
    CHECKPOINTING = "checkpointing"  # next: remove orphans of a crash, create the checkpoint
    TRANSFERRING = "transferring"  # next: run the disk tasks
    COMMITTING = "committing"  # next: commit the restore point on the target, apply retention
    RELEASING = "releasing"  # next: remove the checkpoint
    HOLDING = "holding"  # next: keep the checkpoint for the disks left to resume
    DONE = "done"  # restore point committed, checkpoint removed
    HELD = "held"  # disks left to resume, checkpoint kept
    STOPPED = "stopped"  # stopped before a checkpoint existed: nothing to keep
    FAILED = "failed"


class Notification(enum.StrEnum):
    """A session's webhook delivery (controller.observability.webhooks)."""

    NONE = ""  # the job has no webhook
    PENDING = "pending"  # set with the session's end state, in the same transaction: delivered after a crash too
    SENT = "sent"
    FAILED = "failed"  # the retries were spent, or the URL could not be opened
    SKIPPED = "skipped"  # failures only, and the session did not fail


class ReplicaEnd(enum.StrEnum):
    """What the target was told when a VM's session ended without a restore point (EndReplicaSession),
    written after the call: a VM ended without it being set is told again after a crash."""

    UNTOLD = ""  # not yet (or the VM made a restore point: nothing to tell)
    KEPT = "kept"  # the target keeps the session's writes for the session that resumes the held checkpoint
    ROLLED_BACK = "rolled_back"  # the target returned the replica to its newest restore point
    NOTHING = "nothing"  # the target holds no writes of this session (none made, or another's kept)
    NOT_TOLD = "not_told"  # the call failed (target down, or refused): it rolls back at the next prepare not resuming


class SessionKind(enum.StrEnum):
    """What a session does: replicate the job's VMs, or one of the replica operations (docs/failover.md)."""

    REPLICATION = "replication"
    OPERATION = "operation"


class OperationStepState(enum.StrEnum):
    """One VM in an operation session (operation_vms.state); `step` names the step under way."""

    PLANNED = "planned"  # its group has not started
    RUNNING = "running"  # next: act on `step` (written before acting: a crash re-runs it, each step idempotent)
    ROLLING_BACK = "rolling_back"  # next: undo `step` (the undo steps are idempotent too)
    DONE = "done"
    FAILED = "failed"  # failed where no undo was possible: the VM's state says where it stands
    ROLLED_BACK = "rolled_back"  # failed and undone: the VM is where it was before the operation


class ReplicaVmState(enum.StrEnum):
    """Where a VM of a job stands (replica_vms.state); no row reads as REPLICATING."""

    REPLICATING = "replicating"
    FAILING_OVER = "failing_over"
    FAILED_OVER = "failed_over"
    FAILING_BACK = "failing_back"
    FAILED_BACK = "failed_back"
    PERMANENT = "permanent"
