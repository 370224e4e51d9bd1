"""A failed-over file-host VM (layer disks) replicated by real agents: the proxy reads its checkpoint's layer
disk through the reader factory, and change tracking carries its writes to the next session (failback's
source is such a VM)."""

from __future__ import annotations

import asyncio
import shutil

from tests.integration.conftest import Lab
from vmrepl.disk.layer import create_layer
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.extent import MiB
from vmrepl.providers.base import VmDiskSpec, VmSpec
from vmrepl.providers.filehost import FileHostProvider
from vmrepl.v1 import common_pb2, proxy_pb2


async def test_a_layer_vm_replicates_from_its_checkpoint_and_its_changes_reach_the_next(lab_env: Lab) -> None:
    host = lab_env.image.parent / "host"
    folder = host / "m1"
    folder.mkdir(parents=True)
    shutil.copyfile(lab_env.image, folder / "disk0.base")
    size = (folder / "disk0.base").stat().st_size
    create_layer(folder, "disk0", size=size, base="disk0.base", base_format=DiskFormat.RAW, stores=["p", "t"])
    provider = FileHostProvider(host)
    disk = VmDiskSpec(disk_id="disk0", path="disk0.layer", format=DiskFormat.LAYER, size=size)
    info = await provider.register_vm(VmSpec(name="web01", folder="m1", configuration=b"", disks=(disk,)))
    assert info.power is PowerState.OFF
    await provider.start_vm(info.vm_id)
    vm = provider.vm(info.vm_id)
    await asyncio.to_thread(vm.write, "disk0", 3 * MiB, b"\x5a" * MiB)

    cp1 = await provider.create_checkpoint(info.vm_id)
    d = cp1.disk("disk0")
    frozen = await asyncio.to_thread(vm.read_current, "disk0", 0, size)
    spec = lab_env.spec(
        "s1", source_locator=d.locator, source_format=DiskFormat.LAYER, disk_size=d.size, replica_path="jobs/web01"
    )
    session = asyncio.create_task(lab_env.replicate(spec))
    for i in range(4):  # the guest writes while the session reads its checkpoint
        await asyncio.to_thread(vm.write, "disk0", (8 + 2 * i) * MiB, bytes([i + 1]) * MiB)
    await session
    replica = lab_env.replica("jobs/web01")
    assert replica.read_bytes() == frozen  # the checkpoint held, the layer read whole
    await provider.remove_checkpoint(info.vm_id, cp1.checkpoint_id)  # merged into the layer's top store

    cp2 = await provider.create_checkpoint(info.vm_id)
    changed = await provider.changed_ranges(cp2, "disk0", cp1.reference)
    assert isinstance(changed, list) and len(changed) == 4
    ranges = [common_pb2.ByteRange(offset=e.offset, length=e.length) for e in changed]
    source = proxy_pb2.ChangeSource(changed_ranges=proxy_pb2.ChangedRanges(ranges=ranges, reference_id=cp1.reference))
    spec2 = lab_env.spec(
        "s2",
        source_locator=d.locator,
        source_format=DiskFormat.LAYER,
        disk_size=d.size,
        replica_path="jobs/web01",
        change_source=source,
    )
    result = await lab_env.replicate(spec2)
    assert result.bytes_data == 4 * MiB
    await provider.remove_checkpoint(info.vm_id, cp2.checkpoint_id)
    assert replica.read_bytes() == await asyncio.to_thread(vm.read_current, "disk0", 0, size)
    assert (folder / "disk0.base").read_bytes() == lab_env.image.read_bytes()  # the point under it untouched
