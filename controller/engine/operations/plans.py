"""Each operation's steps and how they undo: pure, unit-tested without a database or agents.

A VM moves through its operation's steps in order. The runner writes the step about to act, commits, then
acts (controller.engine.journal), so a controller killed at any moment finds the step it was doing and does
it again: every step is idempotent. A step that fails starts a rollback: the inverses of the steps done (and
of the one that failed, which may have half acted), last first, each written before it acts in the same way.
A step with no inverse is a point of no return: once it has run, a failure leaves the VM FAILED where it is,
and the same operation run again finishes it (its steps are idempotent).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from controller.db.enums import OperationStepState, ReplicaVmState
from vmrepl.errors import FailedPrecondition
from vmrepl.v1 import controller_pb2 as api


class Operation(enum.StrEnum):
    FAILOVER = "failover"
    PLANNED_FAILOVER = "planned_failover"
    UNDO_FAILOVER = "undo_failover"
    PERMANENT_FAILOVER = "permanent_failover"
    FAILBACK = "failback"
    COMMIT_FAILBACK = "commit_failback"
    UNDO_FAILBACK = "undo_failback"
    TEST_FAILOVER = "test_failover"
    STOP_TEST = "stop_test"

    def to_proto(self) -> api.ReplicaOperation.ValueType:
        return api.ReplicaOperation.Value(f"REPLICA_OPERATION_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> Operation:
        name = api.ReplicaOperation.Name(value).removeprefix("REPLICA_OPERATION_")  # type: ignore[arg-type]
        if name == "UNSPECIFIED":
            raise ValueError("operation unspecified")
        return cls[name]


class Step(enum.StrEnum):
    """A step's name, as OperationVm.step_name shows it."""

    SHUTDOWN_SOURCE = "shutdown-source"
    START_SOURCE = "start-source"
    LAST_INCREMENTAL = "last-incremental"
    MOUNT = "mount"
    UNMOUNT = "unmount"
    REGISTER = "register"
    UNREGISTER = "unregister"
    START = "start"
    STOP = "stop"
    MERGE = "merge"
    FLATTEN = "flatten"
    DELETE_REPLICA = "delete-replica"
    CHECK_ORIGINAL_OFF = "check-original-off"
    SHUTDOWN_FAILED_OVER = "shutdown-failed-over"
    TRANSFER = "transfer"
    ROLLBACK_TRANSFER = "rollback-transfer"
    # The failback folder deleted on the failback target (the original disks stay as they are now).
    FINISH_TRANSFER = "delete-failback-replica"
    START_ORIGINAL = "start-original"
    STOP_ORIGINAL = "stop-original"
    DROP_REFERENCE = "drop-reference"
    # A failback to a new location (controller/engine/operations/newloc.py).
    PLACE_NEW = "place-new"
    REGISTER_NEW = "register-new"
    UNREGISTER_NEW = "unregister-new"
    START_NEW = "start-new"
    STOP_NEW = "stop-new"
    DISCARD_NEW = "discard-new"
    ADOPT_NEW = "adopt-new"
    # The last step of every operation: the VM's new state and the operation's records, in one transaction.
    RECORD = "record"


# Steps whose effect another step undoes; a step missing here (and not in _NOTHING_TO_UNDO) cannot be undone.
INVERSE: dict[Step, Step] = {
    Step.SHUTDOWN_SOURCE: Step.START_SOURCE,
    Step.MOUNT: Step.UNMOUNT,
    Step.REGISTER: Step.UNREGISTER,
    Step.START: Step.STOP,
    Step.STOP: Step.START,
    Step.SHUTDOWN_FAILED_OVER: Step.START,
    Step.TRANSFER: Step.ROLLBACK_TRANSFER,
    Step.START_ORIGINAL: Step.STOP_ORIGINAL,
    Step.STOP_ORIGINAL: Step.START_ORIGINAL,
    Step.REGISTER_NEW: Step.UNREGISTER_NEW,
    Step.START_NEW: Step.STOP_NEW,
    Step.STOP_NEW: Step.START_NEW,
}
# Steps that change nothing to undo: a check, a replication session (its restore point is kept like any).
_NOTHING_TO_UNDO = frozenset({Step.CHECK_ORIGINAL_OFF, Step.LAST_INCREMENTAL, Step.PLACE_NEW, Step.RECORD})


@dataclass(frozen=True, slots=True)
class Plan:
    operation: Operation
    steps: tuple[Step, ...]
    # The VM states the operation may start from, and the state written while it runs.
    allowed_from: frozenset[ReplicaVmState]
    running_state: ReplicaVmState | None

    def next_step(self, step: Step) -> Step | None:
        i = self.steps.index(step)
        return self.steps[i + 1] if i + 1 < len(self.steps) else None

    def undo_steps(self, failed: Step) -> tuple[Step, ...] | None:
        """The steps that return the VM to where it was after `failed` failed (last first); None when a step
        already done cannot be undone (the VM is left where it is, FAILED)."""
        done = self.steps[: self.steps.index(failed) + 1]
        undo: list[Step] = []
        for step in reversed(done):
            if step in INVERSE:
                undo.append(INVERSE[step])
            elif step not in _NOTHING_TO_UNDO:
                return None
        return tuple(undo)


_FAILED_OVER = frozenset({ReplicaVmState.FAILED_OVER})
_REPLICATING = frozenset({ReplicaVmState.REPLICATING})
_S = Step


def _plan(
    op: Operation, steps: Sequence[Step], allowed: frozenset[ReplicaVmState], running: ReplicaVmState | None
) -> Plan:
    return Plan(op, (*steps, Step.RECORD), allowed, running)


PLANS: dict[Operation, Plan] = {
    p.operation: p
    for p in (
        _plan(Operation.FAILOVER, (_S.MOUNT, _S.REGISTER, _S.START), _REPLICATING, ReplicaVmState.FAILING_OVER),
        _plan(
            Operation.PLANNED_FAILOVER,
            (_S.SHUTDOWN_SOURCE, _S.LAST_INCREMENTAL, _S.MOUNT, _S.REGISTER, _S.START),
            _REPLICATING,
            ReplicaVmState.FAILING_OVER,
        ),
        _plan(Operation.UNDO_FAILOVER, (_S.STOP, _S.UNREGISTER, _S.UNMOUNT), _FAILED_OVER, None),
        _plan(
            Operation.FAILBACK,
            (_S.CHECK_ORIGINAL_OFF, _S.SHUTDOWN_FAILED_OVER, _S.TRANSFER, _S.START_ORIGINAL, _S.FINISH_TRANSFER),
            _FAILED_OVER,
            ReplicaVmState.FAILING_BACK,
        ),
        _plan(
            Operation.COMMIT_FAILBACK,
            (_S.FINISH_TRANSFER, _S.UNREGISTER, _S.UNMOUNT, _S.DROP_REFERENCE),
            frozenset({ReplicaVmState.FAILED_BACK}),
            None,
        ),
        _plan(
            Operation.UNDO_FAILBACK,
            (_S.STOP_ORIGINAL, _S.FINISH_TRANSFER, _S.START),
            frozenset({ReplicaVmState.FAILED_BACK}),
            None,
        ),
        _plan(
            Operation.TEST_FAILOVER,
            (_S.MOUNT, _S.REGISTER, _S.START),
            frozenset(ReplicaVmState) - {ReplicaVmState.PERMANENT},
            None,
        ),
        _plan(Operation.STOP_TEST, (_S.STOP, _S.UNREGISTER, _S.UNMOUNT), frozenset(ReplicaVmState), None),
    )
}


def permanent_plan(*, flatten_on_target: bool) -> Plan:
    """Permanent failover. A file host's VM is stopped while the target merges its layers (FlattenMount), then
    started again. A Hyper-V VM is shut down cleanly (it is the production VM now; Hyper-V merges a
    differencing disk only while its VM is off, docs/hyperv.md), the host merges its differencing disks, the
    target makes the base stand alone, and the VM is started again. After the merge nothing goes back: the
    replica is deleted next, then the mount's record (UnmountPoint of a flattened mount drops the record only:
    the folder is the VM's). A file host's MERGE comes after the flatten: the provider then makes vm.toml name
    each merged base, the plain image, instead of the layer's descriptor (FileHostProvider.merge_vm_disks)."""
    steps = (
        (_S.STOP, _S.FLATTEN, _S.MERGE, _S.START, _S.DELETE_REPLICA, _S.UNMOUNT)
        if flatten_on_target
        else (_S.SHUTDOWN_FAILED_OVER, _S.MERGE, _S.FLATTEN, _S.START, _S.DELETE_REPLICA, _S.UNMOUNT)
    )
    return _plan(Operation.PERMANENT_FAILOVER, steps, _FAILED_OVER, None)


# A failback to a new location: the new VM's images are made and written by the transfer (undone: the target
# removes them), the VM registered and started there. The failback folder stays until the failback is
# committed (it is deleted, the images kept, the job's VM becomes the new VM) or undone (the new VM and its
# images removed, the failed-over VM started again). The original VM is never touched.
NEW_LOCATION_PLANS: dict[Operation, Plan] = {
    p.operation: p
    for p in (
        _plan(
            Operation.FAILBACK,
            (_S.PLACE_NEW, _S.SHUTDOWN_FAILED_OVER, _S.TRANSFER, _S.REGISTER_NEW, _S.START_NEW),
            _FAILED_OVER,
            ReplicaVmState.FAILING_BACK,
        ),
        _plan(
            Operation.COMMIT_FAILBACK,
            (_S.FINISH_TRANSFER, _S.UNREGISTER, _S.UNMOUNT, _S.ADOPT_NEW),
            frozenset({ReplicaVmState.FAILED_BACK}),
            None,
        ),
        _plan(
            Operation.UNDO_FAILBACK,
            (_S.STOP_NEW, _S.UNREGISTER_NEW, _S.DISCARD_NEW, _S.START),
            frozenset({ReplicaVmState.FAILED_BACK}),
            None,
        ),
    )
}


def plan_for(op: Operation, *, host_provider: str = "file", new_location: bool = False) -> Plan:
    """The operation's plan; `new_location`: a VM whose failback goes (or went) to a new location."""
    if op is Operation.PERMANENT_FAILOVER:
        return permanent_plan(flatten_on_target=host_provider != "hyperv")
    if new_location and op in NEW_LOCATION_PLANS:
        return NEW_LOCATION_PLANS[op]
    return PLANS[op]


# What a VM's state means in a refusal.
_STATE_WORDS = {
    ReplicaVmState.REPLICATING: "is not failed over",
    ReplicaVmState.FAILING_OVER: "is failing over",
    ReplicaVmState.FAILED_OVER: "is failed over already",
    ReplicaVmState.FAILING_BACK: "is failing back",
    ReplicaVmState.FAILED_BACK: "is failed back",
    ReplicaVmState.PERMANENT: "was failed over permanently and left the job",
}
# What the operator can run on a VM in that state instead (the `vmrepl replica` commands).
_NEXT = {
    ReplicaVmState.REPLICATING: "it can be failed over (failover, planned-failover) or tested (test-failover)",
    ReplicaVmState.FAILED_OVER: "next: undo-failover, failback or permanent-failover (see vmrepl replica show)",
    ReplicaVmState.FAILED_BACK: "next: commit-failback or undo-failback",
}


def check_start(plan: Plan, state: ReplicaVmState, *, vm: str, busy_session: str) -> None:
    """FailedPrecondition, in words, when the operation cannot start on a VM in `state`."""
    if busy_session:
        raise FailedPrecondition(f"VM {vm}: operation session {busy_session} is working on it; wait for it to end")
    if state not in plan.allowed_from:
        verb = plan.operation.value.replace("_", " ")
        hint = f"; {_NEXT[state]}" if state in _NEXT else ""
        raise FailedPrecondition(f"VM {vm} {_STATE_WORDS[state]}: no {verb}{hint}")


def outcome(states: Sequence[OperationStepState]) -> str:
    """The session's end state from its VMs': "succeeded" when every VM is done, else "failed"."""
    return "succeeded" if states and all(s is OperationStepState.DONE for s in states) else "failed"


# After a crash: a VM RUNNING goes on with its step, ROLLING_BACK with its undo step; PLANNED waits its group.
RESUMES = frozenset({OperationStepState.RUNNING, OperationStepState.ROLLING_BACK})
FINAL = frozenset({OperationStepState.DONE, OperationStepState.FAILED, OperationStepState.ROLLED_BACK})
