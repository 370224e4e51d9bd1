"""`make bench`: the block stream against the tools a user would reach for, on the same data, in one run.

Builds a mixed image (30% zero blocks, 40% text, 30% random), replicates it
through a proxy and a target on loopback with mTLS (fsync on commit), then a
digest-comparison incremental over a 5% change (rsync's delta timed on the same
change) and a changed-range incremental over another 5%; times cp + sync, rsync (whole
file and --inplace delta) and qemu-img convert on the same files. The last
line is one JSON object with every figure. Size: BENCH_SIZE_MIB (default 2048).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from controller import lab
from controller.engine.agents import proxy_client, target_client
from controller.engine.transfer import DiskTaskSpec, run_disk_task
from tests.support.certs import tls_settings
from vmrepl.config import TlsSettings
from vmrepl.extent import MiB
from vmrepl.logs import configure_logging
from vmrepl.progress import TransferFigures
from vmrepl.security.ticket import load_signing_key
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2


def drop_caches_hint() -> None:
    # Reads come from the page cache for every tool alike; dropping caches needs root everywhere.
    subprocess.run(["sync"], check=False)


def timed(cmd: list[str], *, sync_path: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if sync_path is not None:
        fd = os.open(sync_path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


class RssSampler:
    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for p in self.procs:
                self.peak = max(self.peak, p.memory_info().rss)
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def replicate(env: dict[str, object], spec: DiskTaskSpec) -> tuple[float, proxy_pb2.TransferProgress]:
    """One session's transfer of the disk, then its restore point (so the next session saves the old bytes of
    every block it overwrites, as every incremental of a real job does); the time includes the commit."""
    tls: TlsSettings = env["tls"]  # type: ignore[assignment]
    p = proxy_client(str(env["proxy"]), tls)
    t = target_client(str(env["target"]), tls)
    try:
        t0 = time.perf_counter()
        result = await run_disk_task(proxy=p, target=t, spec=spec, signing_key=env["key"])  # type: ignore[arg-type]
        await t.commit(
            target_pb2.CommitRestorePointRequest(
                replica_path=spec.replica_path,
                session_id=spec.session_id,
                checkpoint_id=spec.checkpoint_id,
                disk_ids=[spec.disk_id],
            )
        )
        return time.perf_counter() - t0, result
    finally:
        await p.close()
        await t.close()


def stage_summary(r: proxy_pb2.TransferProgress) -> dict[str, float]:
    b = r.busy
    return {
        "source_read_s": round(b.source_read, 2),
        "compress_s": round(b.compress, 2),
        "network_wait_s": round(b.network_wait, 2),
        "target_write_s": round(b.target_write, 2),
    }


def bench_spec(session: str, image: Path, size: int, change: proxy_pb2.ChangeSource | None) -> DiskTaskSpec:
    return DiskTaskSpec(
        session_id=session,
        checkpoint_id=f"cp-{session}",
        disk_id="disk0",
        source_locator=str(image),
        disk_size=size,
        replica_path="bench/vm1",
        change_source=change or proxy_pb2.ChangeSource(full=proxy_pb2.FullRead()),
    )


async def run_agents(
    work: Path, certs: lab.LabCerts, image: Path, size: int, out: dict[str, object], *, rsync_dest: Path
) -> None:
    target = lab.AgentProcess("target_agent", lab.target_config(work, certs), work / "target.log")
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    proxy = lab.AgentProcess(
        "proxy_agent",
        lab.proxy_config(work, certs, sources=image.parent, compress_threads=threads),
        work / "proxy.log",
    )
    target.start()
    proxy.start()
    assert target.proc is not None and proxy.proc is not None
    profiler = start_profiler(work, {"target": target.proc.pid, "proxy": proxy.proc.pid})
    env: dict[str, object] = {
        "tls": tls_settings(certs, "controller"),
        "proxy": proxy.address,
        "target": target.address,
        "key": load_signing_key(certs.signing_key),
    }

    def spec(session: str, change: proxy_pb2.ChangeSource | None = None) -> DiskTaskSpec:
        return bench_spec(session, image, size, change)

    try:
        with RssSampler([target.proc.pid, proxy.proc.pid]) as rss:
            dt, full = await replicate(env, spec("full"))
            out["full_s"] = round(dt, 3)
            out["full_mbps"] = round(size / dt / 1e6, 1)
            out["full_wire_mib"] = round(full.bytes_sent / MiB, 1)
            out["full_stages"] = stage_summary(full)
            # 5% changed, found by comparing digests; rsync's delta is timed on the same change.
            changed = lab.change_blocks(image, fraction=0.05, seed=11)
            out["changed_blocks"] = len(changed)
            out["rsync_delta_s"] = round(
                timed(["rsync", "--inplace", "--no-whole-file", str(image), str(rsync_dest)], sync_path=rsync_dest), 3
            )
            compare = proxy_pb2.ChangeSource(compare_digests=proxy_pb2.CompareDigests())
            dt, incr = await replicate(env, spec("digest", compare))
            out["incr_s"] = round(dt, 3)
            out["incr_data_mib"] = round(incr.bytes_data / MiB, 1)
            out["incr_stages"] = stage_summary(incr)
            # Another 5%, handed over as changed ranges (as RCT reports them).
            changed = lab.change_blocks(image, fraction=0.05, seed=12)
            ranges = [common_pb2.ByteRange(offset=o, length=MiB) for o in changed]
            cs = proxy_pb2.ChangeSource(changed_ranges=proxy_pb2.ChangedRanges(ranges=ranges))
            dt, rr = await replicate(env, spec("ranges", cs))
            out["ranges_incr_s"] = round(dt, 3)
            out["ranges_verification"] = TransferFigures.from_progress(rr).verification
            rollback_dir = work / "datastore" / "bench" / "vm1" / "disks" / "disk0" / "rollback"
            out["rollback_data_mib"] = round(sum(f.stat().st_size for f in rollback_dir.iterdir()) / MiB, 1)
        out["peak_rss_mib"] = round(rss.peak / MiB, 1)
        if profiler is not None:
            out["profile"] = stop_profiler(*profiler)
    finally:
        proxy.stop()
        target.stop()
    replica = work / "datastore" / "bench" / "vm1" / "disks" / "disk0" / "data.raw"
    same = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(image), str(replica)], check=False
    )
    out["replica_identical"] = same.returncode == 0


def start_profiler(work: Path, pids: dict[str, int]) -> tuple[subprocess.Popen[bytes], Path] | None:
    """BENCH_PROFILE=target|proxy samples that agent with py-spy for the whole run (collapsed stacks)."""
    which = os.environ.get("BENCH_PROFILE")
    if not which:
        return None
    out = work / f"{which}.folded"
    proc = subprocess.Popen(
        [
            shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--format",
            "raw",
            "--rate",
            "200",
            "--threads",
            "-o",
            str(out),
            "-p",
            str(pids[which]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let py-spy attach before the run starts
    return proc, out


def stop_profiler(proc: subprocess.Popen[bytes], out: Path) -> dict[str, float]:
    """Top functions by share of samples in which they were on top of a stack (self time)."""
    proc.send_signal(2)
    proc.wait(30)
    counts: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
    shutil.copy(out, Path.cwd() / out.name)
    return {name: round(100 * n / total, 1) for name, n in top}


def ensure_tools() -> None:
    missing = [t for t in ("qemu-img", "rsync") if shutil.which(t) is None]
    if missing:
        print(f"installing {missing} (Debian packages qemu-utils, rsync)", file=sys.stderr)
        pkgs = ["qemu-utils" if t == "qemu-img" else t for t in missing]
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True)


def main() -> None:
    configure_logging(fmt="console", level="warning")
    ensure_tools()
    size = int(os.environ.get("BENCH_SIZE_MIB", "2048")) * MiB
    work = Path("bench-run").resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    certs = lab.LabCerts.create(work / "certs")
    image = work / "src" / "disk.raw"
    lab.make_mixed_image(image, size, seed=5)
    pristine = work / "pristine.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(pristine)], check=True)
    out: dict[str, object] = {
        "size_mib": size // MiB,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }

    # Peers first, on the pristine image, then vmrepl on its copy.
    drop_caches_hint()
    dt = timed(["cp", str(pristine), str(work / "cp.raw")], sync_path=work / "cp.raw")
    out["cp_mbps"] = round(size / dt / 1e6, 1)
    dt = timed(["rsync", "--whole-file", str(pristine), str(work / "rsync.raw")], sync_path=work / "rsync.raw")
    out["rsync_full_mbps"] = round(size / dt / 1e6, 1)
    dt = timed(
        ["qemu-img", "convert", "-O", "raw", str(pristine), str(work / "qemu.raw")],
        sync_path=work / "qemu.raw",
    )
    out["qemu_img_mbps"] = round(size / dt / 1e6, 1)
    for f in ("cp.raw", "qemu.raw"):
        (work / f).unlink()

    asyncio.run(run_agents(work, certs, image, size, out, rsync_dest=work / "rsync.raw"))

    out["full_vs_rsync"] = round(float(out["full_mbps"]) / float(out["rsync_full_mbps"]), 2)  # type: ignore[arg-type]
    out["full_vs_qemu_img"] = round(float(out["full_mbps"]) / float(out["qemu_img_mbps"]), 2)  # type: ignore[arg-type]
    out["ranges_vs_full"] = round(float(out["ranges_incr_s"]) / float(out["full_s"]), 3)  # type: ignore[arg-type]
    out["rsync_delta_vs_incr"] = round(float(out["rsync_delta_s"]) / float(out["incr_s"]), 2)  # type: ignore[arg-type]
    for k, v in out.items():
        print(f"{k:>20}: {v}")
    print(json.dumps(out))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
