"""Incrementals: digest comparison, changed ranges checked by sampling, throttling, VHDX sources."""

from __future__ import annotations

import subprocess

from controller import lab
from tests.conftest import need_tool
from tests.integration.conftest import Lab
from tests.support.replicas import qemu_identical
from vmrepl.domain import DiskFormat, compare_digests
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2, proxy_pb2


def ranges_source(offsets: list[int]) -> proxy_pb2.ChangeSource:
    ranges = [common_pb2.ByteRange(offset=o, length=MiB) for o in offsets]
    return proxy_pb2.ChangeSource(changed_ranges=proxy_pb2.ChangedRanges(ranges=ranges, reference_id="test"))


async def test_digest_incremental_sends_the_changed_blocks_and_no_others(lab_env: Lab) -> None:
    await lab_env.replicate(lab_env.spec("s1"))
    changed = lab.change_blocks(lab_env.image, fraction=0.05, seed=21)
    result = await lab_env.replicate(lab_env.spec("s2", change_source=compare_digests()))
    assert qemu_identical(lab_env.image, lab_env.replica())
    assert result.bytes_data == len(changed) * MiB
    received = [e for e in lab_env.target_events("batch_received") if e["session_id"] == "s2"]
    assert sum(int(str(e["data_bytes"])) for e in received) == len(changed) * MiB  # counted at the target
    size = lab_env.image.stat().st_size
    s = result.skipped
    assert s.unchanged + s.zero + s.unallocated + result.bytes_data == size
    # Nothing changed: a third run sends no data at all.
    again = await lab_env.replicate(lab_env.spec("s3", change_source=compare_digests()))
    assert again.bytes_data == 0


async def test_incomplete_changed_ranges_are_caught_and_repaired(lab_env: Lab) -> None:
    await lab_env.replicate(lab_env.spec("s1"))
    size = lab_env.image.stat().st_size
    # Change the first blocks of the disk (where file systems keep their metadata) and some later ones,
    # but report only the later ones, as a change tracker that lost changes would.
    lost = [0, MiB, 2 * MiB]
    reported = [100 * MiB, 150 * MiB]
    with open(lab_env.image, "r+b") as f:
        for off in lost + reported:
            f.seek(off)
            f.write(bytes([7]) * MiB)
    result = await lab_env.replicate(lab_env.spec("s2", change_source=ranges_source(reported)))
    assert result.passes == 2
    assert result.sample.mismatched_blocks > 0
    assert qemu_identical(lab_env.image, lab_env.replica())
    proxy_log = [e for e in lab_env.proxy.events() if e.get("event") == "sampled_verification_failed"]
    assert proxy_log and proxy_log[0]["session_id"] == "s2"
    assert int(str(proxy_log[0]["mismatched"])) >= len(lost)
    assert result.committed_offset == size


async def test_bandwidth_limit_holds_within_5_percent(lab_env: Lab) -> None:
    from controller.engine.transfer import prepare, start_request

    # 1 MiB batches: bytes_sent moves in frames of at most 1 MiB, under 1% of what 10 s carry. A 64-batch
    # window (~3.6 s of data here) keeps a slow target commit from stalling the sender: the test measures
    # the limiter, whose 0.1 s burst rightly never lets a stalled sender catch up.
    lab_env.restart_proxy(batch_bytes=MiB, window_batches=64)
    limit = 10.0  # MB/s; the 256 MiB mixed image puts ~125 MB on the wire, ~12.5 s
    spec = lab_env.spec("s-throttle", bandwidth_limit_mbps=limit)
    proxy, target = lab_env.proxy_client().stub, lab_env.target_client()
    await prepare(target, spec)
    started = await proxy.StartDiskTransfer(
        start_request(spec, target_address=target.address, signing_key=lab_env.signing_key, proxy="proxy")
    )
    samples = []
    async for p in proxy.WatchTransfer(proxy_pb2.WatchTransferRequest(transfer_id=started.transfer_id)):
        if p.state == proxy_pb2.TRANSFER_STATE_RUNNING and p.elapsed_seconds >= 1.0:
            samples.append((p.elapsed_seconds, p.bytes_sent))
        last = p
    assert last.state == proxy_pb2.TRANSFER_STATE_COMPLETED
    (t0, b0), (t1, b1) = samples[0], samples[-1]
    assert t1 - t0 >= 10, (t0, t1)
    rate = (b1 - b0) / (t1 - t0) / 1e6
    assert abs(rate - limit) / limit <= 0.05, (rate, last.busy)
    assert qemu_identical(lab_env.image, lab_env.replica())


async def test_vhdx_source_replicates_to_an_identical_raw_replica(lab_env: Lab) -> None:
    need_tool("qemu-img")
    vhdx = lab_env.image.with_suffix(".vhdx")
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=8M",
            str(lab_env.image),
            str(vhdx),
        ],
        check=True,
    )
    spec = lab_env.spec("s-vhdx", source_locator=str(vhdx), source_format=DiskFormat.VHDX)
    await lab_env.replicate(spec)
    out = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "vhdx", "-F", "raw", str(vhdx), str(lab_env.replica())], check=False
    )
    assert out.returncode == 0
