"""A file-backed VM replicated from its checkpoint while the guest keeps writing."""

from __future__ import annotations

import asyncio
import hashlib

from controller import lab
from tests.conftest import need_tool
from tests.integration.conftest import Lab
from tests.support.replicas import qemu_identical
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider
from vmrepl.v1 import common_pb2, proxy_pb2


async def test_checkpoint_holds_during_a_session_and_changes_reach_the_next(lab_env: Lab) -> None:
    for tool in ("sfdisk", "mkntfs", "ntfscp", "mkswap"):
        need_tool(tool)
    host = lab_env.image.parent / "host"
    lab.create_sample_vm(host, "web01", size=128 * MiB)
    provider = FileHostProvider(host)
    vm = provider.vm("web01")

    cp1 = await provider.create_checkpoint("web01")
    d = cp1.disk("disk0")
    frozen = hashlib.sha256(open(d.locator, "rb").read()).hexdigest()  # noqa: SIM115
    spec = lab_env.spec("s1", source_locator=d.locator, disk_size=d.size, replica_path="jobs/web01")
    session = asyncio.create_task(lab_env.replicate(spec))
    # The guest writes while the session reads its checkpoint.
    for i in range(8):
        await asyncio.to_thread(vm.write, "disk0", (40 + 3 * i) * MiB, bytes([i + 1]) * MiB)
    await session
    replica = lab_env.replica("jobs/web01")
    assert hashlib.sha256(replica.read_bytes()).hexdigest() == frozen  # the checkpoint held
    await provider.remove_checkpoint("web01", cp1.checkpoint_id)  # merges the writes into the disk

    cp2 = await provider.create_checkpoint("web01")
    changed = await provider.changed_ranges(cp2, "disk0", cp1.reference)
    assert isinstance(changed, list) and len(changed) == 8
    ranges = [common_pb2.ByteRange(offset=e.offset, length=e.length) for e in changed]
    source = proxy_pb2.ChangeSource(changed_ranges=proxy_pb2.ChangedRanges(ranges=ranges, reference_id=cp1.reference))
    spec2 = lab_env.spec("s2", source_locator=d.locator, disk_size=d.size, replica_path="jobs/web01",
                         change_source=source)  # fmt: skip
    result = await lab_env.replicate(spec2)
    assert result.bytes_data == 8 * MiB and result.sample.sampled_blocks > 0 and not result.sample.mismatched_blocks
    await provider.remove_checkpoint("web01", cp2.checkpoint_id)
    assert qemu_identical(vm.image("disk0"), replica)  # the writes reached the next session
