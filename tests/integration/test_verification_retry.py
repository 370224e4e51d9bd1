"""A changed-range pass whose sampled verification failed: the session says so, and a retry does not trust it.

The first verification proved the change tracking lost writes for this checkpoint. A new proxy transfer of
the same session and checkpoint (the controller's retry after the proxy was lost) must not trust the same
change tracking again: its sample may miss what the lost pass had not yet repaired. Through the controller,
the ended session shows each disk's passes and what its sample found (GetSession, `vmrepl session show`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess

from proxy_agent.verify import choose_sample, unsent_blocks
from tests.integration.conftest import Lab
from tests.integration.controller_env import ControllerEnv
from tests.integration.test_incremental import ranges_source
from tests.integration.test_power_cut import restart_target
from tests.support.replicas import qemu_identical
from vmrepl.extent import Extent, MiB
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import proxy_pb2

GiB = 1024 * MiB
SIZE = 4 * GiB  # sparse: a disk larger than what a crash leaves uncertain (FRONTIER_STEP and a half)
REPORTED = [100 * MiB]


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
        disk = await target.get_disk("jobs/vm1", "disk0", within=2)
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


def _write_untracked(ctl: ControllerEnv, vm: str, disk: str, offset: int, data: bytes) -> None:
    """A write the host's change tracking never saw (no checkpoint exists between sessions)."""
    fd = os.open(ctl.vm(vm).image(disk), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_session_shows_the_disk_its_sample_sent_back_as_a_digest_comparison(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm1",))
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    for disk in ("disk0", "disk1"):
        ctl_raw.vm("vm1").write(disk, 4 * MiB, b"\x5a" * MiB)  # tracked: the changed ranges name it
    # Untracked, in disk0's first block: the sample always reads the first unsent blocks, so it must differ.
    _write_untracked(ctl_raw, "vm1", "disk0", 4096, b"\xa5" * 4096)
    session = ctl_raw.run_job()
    assert session.state == api.SESSION_STATE_SUCCEEDED, session.error
    for disk in ("disk0", "disk1"):
        assert qemu_identical(ctl_raw.vm("vm1").image(disk), ctl_raw.replica("vm1", disk)), disk

    disks = {d.disk_id: d for v in session.vms for d in v.disks}
    rerun, kept = disks["disk0"], disks["disk1"]
    assert rerun.change_mode == kept.change_mode == "ranges"
    assert rerun.passes == 2 and 1 <= rerun.sample.mismatched_blocks <= rerun.sample.sampled_blocks
    assert rerun.verification == (
        f"sample differed ({rerun.sample.mismatched_blocks} of {rerun.sample.sampled_blocks} unsent blocks): "
        "re-run as digest comparison, pass 2"
    )
    assert kept.passes == 1 and kept.sample.sampled_blocks > 0 and kept.sample.mismatched_blocks == 0
    assert kept.verification == f"sampled {kept.sample.sampled_blocks} unsent blocks: equal"

    shown = json.loads(ctl_raw.cli("session", "show", session.name, "--json").stdout)
    as_json = {d["disk_id"]: d for v in shown["vms"] for d in v["disks"]}
    assert as_json["disk0"]["passes"] == 2 and as_json["disk0"]["verification"] == rerun.verification
    assert as_json["disk0"]["sample"]["mismatched_blocks"] == rerun.sample.mismatched_blocks
    assert as_json["disk1"]["passes"] == 1 and as_json["disk1"]["verification"] == kept.verification
    table = ctl_raw.cli("session", "show", session.name).stdout
    assert "passes" in table and "verified" in table and "differed" in table, table
