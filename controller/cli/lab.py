"""`vmrepl lab`: File-backed lab VMs, for demos and tests (local, not through the API)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.common import EXIT_FAILED, err, out
from vmrepl.errors import VmreplError

lab_app = typer.Typer(
    help="File-backed lab VMs, for demos and tests (local, not through the API).", no_args_is_help=True
)


@contextmanager
def _refused() -> Iterator[None]:
    """The provider's refusals (no such VM, a VM that is off, a damaged folder) as one line, exit 1."""
    try:
        yield
    except VmreplError as e:
        err.print(f"[red]error[/red]: {e}")
        raise typer.Exit(EXIT_FAILED) from None


@lab_app.command("create-vm")
def lab_create_vm(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    name: str,
    size_mib: Annotated[
        int, typer.Option(min=64, help="disk size (at least 64: the NTFS partition holds 26 MiB of files)")
    ] = 256,
    seed: Annotated[int, typer.Option(help="content seed (the VM's id is random whatever the seed)")] = 1,
) -> None:
    """A sample VM: a GPT disk with an NTFS partition (mkntfs, ntfscp) and a swap partition (mkswap)."""
    from controller.lab import create_sample_vm
    from vmrepl.providers.filehost import load_manifest

    vm_dir = create_sample_vm(host_dir, name, size=size_mib << 20, seed=seed)
    out.print(f"created VM {name} (id {load_manifest(vm_dir).id}) in {vm_dir}")


@lab_app.command("write")
def lab_write(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    disk: Annotated[str, typer.Option(help="disk id")] = "disk0",
    blocks: Annotated[int, typer.Option(min=1, help="how many 1 MiB-aligned ranges to change")] = 8,
    length: Annotated[int, typer.Option(min=1, help="bytes written in each")] = 64 << 10,
    seed: Annotated[int, typer.Option(help="random seed (offsets and data)")] = 0,
) -> None:
    """Write random data as the guest would (into the checkpoint overlay while one exists)."""
    from vmrepl.providers.filehost import FileHostProvider

    with _refused():
        file_vm = FileHostProvider(host_dir).vm(vm)
        size = file_vm.size(disk)
        rng = random.Random(seed or time.time_ns())
        offsets = sorted(rng.sample(range(size >> 20), min(blocks, size >> 20)))
        for block in offsets:
            file_vm.write(disk, block << 20, rng.randbytes(min(length, size - (block << 20))))
    out.print(f"wrote {len(offsets)} x {length} bytes to {vm}/{disk}")


@lab_app.command("stop-vm")
def lab_stop_vm(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    vm: Annotated[str, typer.Argument(help="VM id or name")],
) -> None:
    """Power a VM off (its .vmrepl/power): writes are refused until it is started; a failback needs the
    original VM off."""
    _set_power(host_dir, vm, on=False)


@lab_app.command("start-vm")
def lab_start_vm(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    vm: Annotated[str, typer.Argument(help="VM id or name")],
) -> None:
    """Power a VM on again (what the provider's start_vm does)."""
    _set_power(host_dir, vm, on=True)


def _set_power(host_dir: Path, vm: str, *, on: bool) -> None:
    from vmrepl.domain import PowerState
    from vmrepl.providers.filehost import FileHostProvider

    with _refused():
        file_vm = FileHostProvider(host_dir).vm(vm)
        file_vm.set_power(PowerState.RUNNING if on else PowerState.OFF)
    out.print(f"{vm} is {file_vm.power().value}")
