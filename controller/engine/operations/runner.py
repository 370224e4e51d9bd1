"""One VM through its operation's plan, every step written through the journal before it acts.

The row's `step` is the step to do next. RUNNING: act, then write the next step (with what the step found)
in one committed change; the last step, RECORD, writes the VM's new replica state with DONE. A step that
fails writes ROLLING_BACK with the undo steps (controller.engine.operations.plans), done the same way, ending
ROLLED_BACK; FAILED where nothing can be undone. A controller killed anywhere finds the row RUNNING or
ROLLING_BACK with the step it was in, and does that step again (each is idempotent)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from controller.db.enums import OperationStepState as St
from controller.db.models import OperationVm, now
from controller.engine.journal import Journal
from controller.engine.operations import records
from controller.engine.operations.context import OperationContext
from controller.engine.operations.plans import RESUMES, Plan, Step
from controller.engine.operations.steps import Steps
from vmrepl.errors import FailedPrecondition, VmreplError
from vmrepl.logs import get_logger

log = get_logger("vmrepl.controller.engine.operations")
ERRORS = (VmreplError, grpc.aio.AioRpcError)
# Found values kept in their own columns (shown by the API); everything else stays in `data`.
_COLUMNS = ("point_id", "bytes_copied", "bytes_read", "bytes_sent", "blocks_differing")


def describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


async def _own(db: AsyncSession, row_id: str) -> OperationVm:
    r = await db.get(OperationVm, row_id)
    if r is None:  # the session (and its rows) deleted with its job meanwhile
        raise FailedPrecondition(f"operation row {row_id} vanished from the database")
    return r


class VmOperation:
    def __init__(
        self,
        ctx: OperationContext,
        journal: Journal,
        plan: Plan,
        row_id: str,
        *,
        on_change: Callable[[str], None] = lambda _session_id: None,
    ) -> None:
        self.ctx = ctx
        # Told the session's id after each step written (WatchSession's watchers wake up).
        self.on_change = on_change
        self.journal = journal
        self.plan = plan
        self.row_id = row_id
        self.steps = Steps(ctx, journal)
        self.log = log.bind(session_id=ctx.session_id, operation=ctx.operation.value)

    async def run(self) -> St:
        row = await self.journal.load(OperationVm, self.row_id)
        self.log = self.log.bind(vm=row.vm_name)
        if row.state is St.PLANNED:
            row = await self._write(row, "operation vm started", state=St.RUNNING, step=self.plan.steps[0].value)
        while row.state in RESUMES:
            row = await self._one(row)
        return row.state

    async def _write(self, row: OperationVm, what: str, **values: Any) -> OperationVm:
        async with self.journal.change(what, session_id=self.ctx.session_id, vm=row.vm_id, **values) as db:
            r = await _own(db, row.id)
            for k, v in values.items():
                setattr(r, k, v)
            if r.started_at is None:
                r.started_at = now()
        self.on_change(self.ctx.session_id)
        return await self.journal.load(OperationVm, row.id)

    async def _one(self, row: OperationVm) -> OperationVm:
        step = Step(row.step)
        if row.state is St.RUNNING and step is Step.RECORD:
            return await self._end(row, St.DONE)
        self.log.info("operation_step", step=step.value, state=row.state.value)
        try:
            found = await self.steps.act(step, row)
        except asyncio.CancelledError:
            raise
        except ERRORS as e:
            return await self._failed(row, step, describe(e))
        return await self._advance(row, step, found)

    async def _advance(self, row: OperationVm, step: Step, found: dict[str, Any]) -> OperationVm:
        values: dict[str, Any] = {k: found.pop(k) for k in _COLUMNS if k in found}
        data = {**row.data, **found}
        if row.state is St.RUNNING:
            nxt = self.plan.next_step(step)
            return await self._write(row, "operation step", data=data, step=(nxt or Step.RECORD).value, **values)
        undo = list(data.get("undo", []))[1:]
        data["undo"] = undo
        if undo:
            return await self._write(row, "operation undo step", data=data, step=undo[0], **values)
        row = await self._write(row, "operation undo step", data=data, **values)
        return await self._end(row, St.ROLLED_BACK)

    async def _failed(self, row: OperationVm, step: Step, error: str) -> OperationVm:
        self.log.warning("operation_step_failed", step=step.value, error=error)
        if row.state is St.ROLLING_BACK:
            return await self._end(
                row, St.FAILED, error=f"{row.error}; undoing it failed at {step.value}: {error}", failed=step
            )
        undo = self.plan.undo_steps(step)
        message = f"{step.value}: {error}"
        if undo is None:
            return await self._end(
                row, St.FAILED, error=f"{message} (left as it is: run the operation again to finish it)", failed=step
            )
        if not undo:
            return await self._end(row, St.ROLLED_BACK, error=message)
        data = {**row.data, "undo": [s.value for s in undo], "failed_step": step.value}
        return await self._write(
            row, "operation rolling back", state=St.ROLLING_BACK, step=undo[0].value, error=message, data=data
        )

    async def _end(self, row: OperationVm, state: St, *, error: str = "", failed: Step = Step.RECORD) -> OperationVm:
        async with self.journal.change("operation vm ended", session_id=self.ctx.session_id, vm=row.vm_id) as db:
            r = await _own(db, row.id)
            r.state, r.ended_at = state, now()
            if error:
                r.error = error
            if state is St.DONE:
                await records.record_done(db, self.ctx, r)
            elif state is St.ROLLED_BACK:
                await records.record_rolled_back(db, self.ctx, r)
            else:
                await records.record_failed(db, self.ctx, r, failed)
        self.log.info("operation_vm_ended", state=state.value, error=error or None)
        return await self.journal.load(OperationVm, row.id)
