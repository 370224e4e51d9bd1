"""`make demo`: replicate a sample disk end to end on loopback with mTLS, and prove the replica identical.

Starts a target and a proxy as real processes, creates a 256 MiB sample image
(30% zero blocks, 40% text, 30% random), replicates it, changes 5% of its
blocks and replicates only those (as a change tracker reports them), then
checks the replica with `qemu-img compare`. Everything lives in ./demo-run and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from controller import lab
from controller.agents import proxy_client, target_client
from controller.disk_task import DiskTaskSpec, run_disk_task
from protos.vmrepl.v1 import common_pb2, proxy_pb2
from vmrepl.config import TlsSettings
from vmrepl.extent import MiB
from vmrepl.logs import configure_logging
from vmrepl.security.ticket import load_signing_key

SIZE = 256 * MiB


def _bar(p: proxy_pb2.TransferProgress) -> None:
    done = p.committed_offset / p.disk_size if p.disk_size else 0
    filled = int(done * 30)
    mb = p.bytes_sent / 1e6
    sys.stdout.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {done:6.1%}  {mb:8.1f} MB sent ")
    sys.stdout.flush()


async def _replicate(
    proxy: lab.AgentProcess,
    target: lab.AgentProcess,
    certs: lab.LabCerts,
    *,
    image: Path,
    size: int,
    label: str,
    changed: list[int] | None = None,
) -> proxy_pb2.TransferProgress:
    tls = TlsSettings(**certs.tls("controller"))  # type: ignore[arg-type]
    p, t = proxy_client(proxy.address, tls), target_client(target.address, tls)
    try:
        spec = DiskTaskSpec(
            session_id=f"demo-{uuid.uuid4().hex[:8]}",
            disk_id="disk0",
            source_locator=str(image),
            disk_size=size,
            replica_path="demo/vm1",
            change_source=_change_source(changed),
        )
        print(f"{label}:")
        t0 = time.perf_counter()
        result = await run_disk_task(
            proxy=p, target=t, spec=spec, signing_key=load_signing_key(certs.signing_key), on_progress=_bar
        )
        dt = time.perf_counter() - t0
        s = result.skipped
        print(
            f"\n  {spec.disk_size / MiB:.0f} MiB disk in {dt:.2f} s: read {result.bytes_read / MiB:.0f} MiB, "
            f"sent {result.bytes_sent / MiB:.1f} MiB; skipped zero {s.zero / MiB:.0f} MiB, "
            f"unallocated {s.unallocated / MiB:.0f} MiB, unchanged {s.unchanged / MiB:.0f} MiB"
        )
        return result
    finally:
        await p.close()
        await t.close()


def _change_source(changed: list[int] | None) -> proxy_pb2.ChangeSource:
    if changed is None:
        return proxy_pb2.ChangeSource(full=proxy_pb2.FullRead())
    ranges = [common_pb2.ByteRange(offset=o, length=MiB) for o in changed]
    return proxy_pb2.ChangeSource(changed_ranges=proxy_pb2.ChangedRanges(ranges=ranges, reference_id="demo"))


def _compare(image: Path, replica: Path) -> None:
    out = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(replica)],
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"  qemu-img compare: {out.stdout.strip() or out.stderr.strip()}")
    if out.returncode != 0:
        raise SystemExit("demo failed: the replica differs from the source")


def main() -> None:
    configure_logging(fmt="console", level="warning")
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is needed for the demo (Debian: apt-get install qemu-utils)")
    work = Path("demo-run").resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "sources").mkdir(parents=True)
    certs = lab.LabCerts.create(work / "certs")
    image = work / "sources" / "vm1-disk0.raw"
    counts = lab.make_mixed_image(image, SIZE)
    print(f"sample disk {image} ({SIZE // MiB} MiB; blocks: {counts})")
    target = lab.AgentProcess("target_agent", lab.target_config(work, certs), work / "target.log")
    proxy = lab.AgentProcess("proxy_agent", lab.proxy_config(work, certs, sources=work / "sources"), work / "proxy.log")
    try:
        target.start()
        proxy.start()
        print(f"target on {target.address}, proxy on {proxy.address} (mTLS)")
        replica = work / "datastore" / "demo" / "vm1" / "disks" / "disk0" / "data.raw"
        asyncio.run(_replicate(proxy, target, certs, image=image, size=SIZE, label="full replication"))
        _compare(image, replica)
        changed = lab.change_blocks(image, fraction=0.05)
        print(f"changed {len(changed)} blocks of the source, replicating only those")
        asyncio.run(
            _replicate(
                proxy,
                target,
                certs,
                image=image,
                size=SIZE,
                label="incremental from changed ranges",
                changed=changed,
            )
        )
        _compare(image, replica)
        print("replica is identical to the source")
    finally:
        proxy.stop()
        target.stop()


if __name__ == "__main__":
    main()
