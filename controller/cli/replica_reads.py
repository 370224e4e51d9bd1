"""`vmrepl replica verify` and `vmrepl restore-points export`: reading a replica back from its target."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from controller.cli.common import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_USAGE, JsonOpt, conn, err, out, shown
from controller.cli.export_file import ExportFormat, write_export, writer_factory
from controller.cli.replicas import replica_app
from controller.cli.sessions import points_app
from vmrepl.errors import VmreplError
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

T = TypeVar("T")
EXIT_MISMATCH = 4  # the verification ran and found blocks that differ from their digests
SHOWN_MISMATCHES = 50  # per disk in the report; --json lists every one


@dataclass
class DiskReport:
    last: common_pb2.VerifyProgress
    mismatches: list[common_pb2.ByteRange] = field(default_factory=list)


def _stream_errors(items: Iterator[T]) -> Iterator[T]:
    """A server stream; a gRPC error becomes a one-line message and exit status 1."""
    try:
        yield from items
    except grpc.RpcError as e:
        err.print(f"[red]error[/red]: {e.code().name}: {shown(e.details())}")  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_FAILED) from None


def collect_verification(stream: Iterator[common_pb2.VerifyProgress], *, quiet: bool) -> dict[str, DiskReport]:
    """Follow a verification with a bar per disk; every disk's last message and all its mismatches."""
    disks: dict[str, DiskReport] = {}
    bars_of: dict[str, TaskID] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"))
    with Progress(*columns, console=err, disable=quiet) as bars:
        for m in stream:
            report = disks.setdefault(m.disk_id, DiskReport(m))
            report.last = m
            report.mismatches.extend(m.mismatches)
            if m.disk_id not in bars_of:
                bars_of[m.disk_id] = bars.add_task(m.disk_id, total=m.blocks_total or 1)
            bars.update(
                bars_of[m.disk_id],
                completed=m.blocks_checked,
                description=f"{m.disk_id} mismatches {m.mismatch_count}",
            )
    return disks


def report_verification(disks: dict[str, DiskReport], *, as_json_: bool, sample: int = 0) -> int:
    """Print the report; the exit status: 0 all vouched for, 4 mismatches, 3 blocks unknown, 1 unfinished."""
    if as_json_:
        print(json.dumps({"disks": [_disk_json(r) for r in disks.values()]}, indent=2))
    for disk_id, r in disks.items():
        m = r.last
        if not as_json_:
            # A sample's total is the sample's size: "7 of 7" would read as the whole disk.
            checked = (
                f"{m.blocks_checked} blocks checked (a random {sample}% sample)"
                if 0 < sample < 100
                else f"{m.blocks_checked} of {m.blocks_total} blocks checked"
            )
            out.print(
                f"{disk_id}: {checked}, {m.block_size} bytes each; "
                f"{m.blocks_unknown} with unknown digests, {m.mismatch_count} mismatched"
                + ("" if m.done else " [red](not finished)[/red]")
            )
            for b in r.mismatches[:SHOWN_MISMATCHES]:
                out.print(f"  mismatch at offset {b.offset} ({b.offset:#x}), {b.length} bytes")
            if len(r.mismatches) > SHOWN_MISMATCHES:
                out.print(f"  ... and {len(r.mismatches) - SHOWN_MISMATCHES} more (--json lists them all)")
    if not disks or not all(r.last.done for r in disks.values()):
        err.print("[red]error[/red]: the verification ended before every disk was done")
        return EXIT_FAILED
    if any(r.last.mismatch_count for r in disks.values()):
        return EXIT_MISMATCH
    return EXIT_INCOMPLETE if any(r.last.blocks_unknown for r in disks.values()) else 0


def _disk_json(r: DiskReport) -> dict[str, object]:
    m = r.last
    return {
        "disk_id": m.disk_id,
        "block_size": m.block_size,
        "blocks_total": m.blocks_total,
        "blocks_checked": m.blocks_checked,
        "blocks_unknown": m.blocks_unknown,
        "mismatch_count": m.mismatch_count,
        "done": m.done,
        "mismatches": [{"offset": b.offset, "length": b.length} for b in r.mismatches],
    }


@replica_app.command("verify")
def replica_verify(
    job: str,
    vm: Annotated[str, typer.Option(help="the VM's id or name (not needed when the job has one VM)")] = "",
    point: Annotated[
        str, typer.Option(help="restore point id, as `restore-points list` shows it; default newest")
    ] = "",
    sample: Annotated[
        int, typer.Option(min=0, max=100, help="percent of blocks to check, chosen at random; 0: every block")
    ] = 0,
    as_json_: JsonOpt = False,
) -> None:
    """Re-read a VM's replica at a restore point on its target and check every block's (or a sample's)
    digest; lists mismatches by offset. Exit status: 0 all checked blocks match, 4 mismatches found, 3 some
    blocks' digests are unknown (cannot be vouched for), 1 the check failed or did not finish."""
    request = api.VerifyJobReplicaRequest(job=f"jobs/{job}", vm=vm, restore_point=point, sample_percent=sample)
    stream = _stream_errors(conn.stub().VerifyJobReplica(request))  # no deadline: a large disk takes long
    disks = collect_verification(stream, quiet=as_json_)
    raise typer.Exit(report_verification(disks, as_json_=as_json_, sample=sample))


@points_app.command("export")
def points_export(
    job: str,
    point_id: str,
    disk: Annotated[str, typer.Option(help="the disk's id (`restore-points list` shows each point's disks)")],
    output: Annotated[Path, typer.Option(help="the file to write (refused if it exists, unless --force)")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="raw (sparse) or vhdx")] = ExportFormat.RAW,
    force: Annotated[bool, typer.Option(help="replace an existing output file")] = False,
    vm: Annotated[str, typer.Option(help="the VM's id or name (not needed: the point is one VM's)")] = "",
) -> None:
    """Write one disk of a restore point to a file (sparse), to restore a VM by hand. The file appears only
    once complete (it is written as FILE.partial first)."""
    try:
        writer = writer_factory(fmt)
    except VmreplError as e:
        err.print(f"[red]error[/red]: --format {fmt.value}: {e}")
        raise typer.Exit(EXIT_USAGE) from None
    request = api.ExportRestorePointRequest(job=f"jobs/{job}", restore_point=point_id, vm=vm, disk=disk)
    columns = (TextColumn(f"{disk}"), BarColumn(), DownloadColumn(binary_units=True))
    with Progress(*columns, console=err) as bars:
        bar = bars.add_task(disk, total=None)
        try:
            size = write_export(
                _stream_errors(conn.stub().ExportRestorePoint(request)),
                output,
                writer=writer,
                force=force,
                progress=lambda done, total: bars.update(bar, completed=done, total=total),
            )
        except VmreplError as e:
            err.print(f"[red]error[/red]: {e}")
            raise typer.Exit(EXIT_FAILED) from None
        except OSError as e:
            err.print(f"[red]error[/red]: {output}: {e.strerror or e}")
            raise typer.Exit(EXIT_FAILED) from None
    out.print(f"wrote {output} ({size} bytes, {fmt.value})")
