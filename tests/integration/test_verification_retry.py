"""A changed-range pass whose sampled verification failed, interrupted during its comparison pass.

The first verification proved the change tracking lost writes for this checkpoint. A new proxy transfer of
the same session and checkpoint (the controller's retry after the proxy was lost) must not trust the same
change tracking again: its sample may miss what the lost pass had not yet repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess

from controller.engine.agents import AgentClient
from proxy_agent.verify import choose_sample, unsent_blocks
from tests.integration.conftest import Lab, qemu_identical
from tests.integration.test_incremental import ranges_source
from tests.integration.test_power_cut import restart_target
from vmrepl.extent import Extent, MiB
from vmrepl.v1 import proxy_pb2, target_pb2

GiB = 1024 * MiB
SIZE = 4 * GiB  # sparse: a disk larger than what a crash leaves uncertain (FRONTIER_STEP and a half)
REPORTED = [100 * MiB]


async def _replica_disk(target: AgentClient) -> target_pb2.ReplicaDisk:
    disk: target_pb2.ReplicaDisk = await target.stub.GetReplicaDisk(
        target_pb2.GetReplicaDiskRequest(replica_path="jobs/vm1", disk_id="disk0"), timeout=2
    )
    return disk


def _retry_seed() -> tuple[str, int]:
    """A transfer id whose sample looks only at the disk's first blocks and past its first GiB (where the
    interrupted pass left nothing uncertain), and a late block outside the sample."""
    unsent = list(unsent_blocks([Extent(o, MiB) for o in REPORTED], disk_size=SIZE, block_size=MiB))
    for i in range(1000):
        sample = choose_sample(unsent, disk_blocks=SIZE // MiB, seed=f"t-retry-{i}")
        if all(b.offset < 16 * MiB or b.offset >= GiB for b in sample):
            taken = {b.offset for b in sample}
            return f"t-retry-{i}", next(o for o in range(SIZE - MiB, 0, -MiB) if o not in taken)
    raise AssertionError("no such transfer id")


async def test_a_retry_after_a_failed_verification_does_not_trust_the_change_tracking_again(lab_env: Lab) -> None:
    image = lab_env.image.with_name("big.raw")
    subprocess.run(["cp", "--sparse=always", str(lab_env.image), str(image)], check=True)
    os.truncate(image, SIZE)  # the lab's 256 MiB of mixed data, then holes
    spec = lab_env.spec("s1", source_locator=str(image), disk_size=SIZE)
    await lab_env.replicate(spec)
    retry_id, late = _retry_seed()
    lost = [0, MiB, 2 * MiB, late]
    with open(image, "r+b") as f:
        for off in lost + REPORTED:
            f.seek(off)
            f.write(bytes([7]) * MiB)
    # One block per batch, slow reads and writes: the comparison pass takes seconds, long enough to lose its proxy.
    restart_target(lab_env, write_delay_ms=40)
    lab_env.restart_proxy(batch_bytes=MiB, test_read_delay_ms=50)
    spec = dataclasses.replace(spec, session_id="s2", checkpoint_id="cp-s2", transfer_id="t-first")
    spec = dataclasses.replace(spec, change_source=ranges_source(REPORTED))
    first = asyncio.create_task(lab_env.replicate(spec))
    target = lab_env.target_client()
    for _ in range(3000):
        disk = await _replica_disk(target)
        if disk.pass_number == 1 and 3 * MiB <= disk.committed_offset < 512 * MiB:
            break
        assert not first.done(), "the comparison pass ended before the proxy could be lost"
        await asyncio.sleep(0.02)
    lab_env.proxy.kill()  # the lost writes at the start are repaired, the late one is not
    with contextlib.suppress(Exception):
        await first
    lab_env.proxy.start()
    result = await lab_env.replicate(dataclasses.replace(spec, transfer_id=retry_id))
    assert result.state == proxy_pb2.TRANSFER_STATE_COMPLETED
    replica = lab_env.replica()
    assert qemu_identical(image, replica), (
        f"the retry succeeded (sample: {result.sample}) with block {late // MiB} never repaired"
    )
