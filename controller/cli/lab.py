"""`vmrepl lab`: File-backed lab VMs, for demos and tests (local, not through the API)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.common import out

lab_app = typer.Typer(
    help="File-backed lab VMs, for demos and tests (local, not through the API).", no_args_is_help=True
)


@lab_app.command("create-vm")
def lab_create_vm(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    name: str,
    size_mib: Annotated[int, typer.Option(min=1, help="disk size")] = 256,
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

    file_vm = FileHostProvider(host_dir).vm(vm)
    size = file_vm.size(disk)
    rng = random.Random(seed or time.time_ns())
    offsets = sorted(rng.sample(range(size >> 20), min(blocks, size >> 20)))
    for block in offsets:
        file_vm.write(disk, block << 20, rng.randbytes(min(length, size - (block << 20))))
    out.print(f"wrote {len(offsets)} x {length} bytes to {vm}/{disk}")
