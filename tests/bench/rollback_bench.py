"""What restore points with data cost, measured on the target's own code (in-process, real files, fsync).

On a disk of BENCH_SIZE_MIB (default 1024) MiB with 1 MiB blocks, 60% of them holding data: the time of an
incremental writing a 5% change into a replica without a restore point (nothing saved) and with one (each
changed block's old bytes read and saved durably first); reading the newest point (the replica file) and
the oldest of three (the file overlaid with two rollback files); deleting the oldest point (retention) and
folding a point between others. Prints one JSON object. Run: `.venv/bin/python -m tests.bench.rollback_bench`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from target_agent import replica, restore_points, vm_replica
from target_agent.points import open_point_disk
from target_agent.replica import DiskGuard
from vmrepl.batch import DecodedBatch, DecodedExtent, PassDigest
from vmrepl.block import digest
from vmrepl.extent import MiB

BS = MiB
BATCH = 16  # blocks per batch, as a proxy's 16 MiB batches carry


class Bench:
    def __init__(self, root: Path, size: int) -> None:
        self.vm = root / "vm"
        self.disk = self.vm / "disks" / "d0"
        self.size = size
        self._guards: dict[Path, DiskGuard] = {}

    def guard(self, d: Path) -> DiskGuard:
        return self._guards.setdefault(d, DiskGuard())

    def session(self, sid: str, blocks: list[int], rng: random.Random, *, commit: bool = True) -> float:
        t0 = time.perf_counter()
        vm_replica.prepare_disk(
            self.vm, self.disk, guards=self.guard, disk_size=self.size, block_size=BS, session_id=sid,
            checkpoint_id=sid,
        )  # fmt: skip
        stream = replica.ReplicaStream(
            self.disk, self.guard(self.disk), session_id=sid, checkpoint_id=sid, disk_size=self.size,
            block_size=BS, pass_number=0,
        )  # fmt: skip
        try:
            for i in range(0, len(blocks), BATCH):
                exts = []
                for b in blocks[i : i + BATCH]:
                    data = rng.randbytes(BS)
                    exts.append(DecodedExtent(b * BS, BS, digest(data), data))
                stream.apply(DecodedBatch(i, exts[-1].offset + BS, False, exts, PassDigest(), BS * len(exts)))
                if (i // BATCH) % 4 == 3:
                    stream.commit(stream.mark(exts[-1].offset + BS, final=False))
            stream.commit(stream.mark(self.size, final=True))
        finally:
            stream.close()
        if commit:
            restore_points.commit(self.vm, session_id=sid, checkpoint_id=sid, disk_ids=["d0"], guard=self.guard)
        return time.perf_counter() - t0

    def read_point(self, point_id: str) -> float:
        t0 = time.perf_counter()
        disk = open_point_disk(self.vm, point_id, "d0")
        buf = memoryview(bytearray(16 * MiB))
        try:
            for off in range(0, disk.size, len(buf)):
                n = min(len(buf), disk.size - off)
                disk.read_into(buf[:n], off)
        finally:
            disk.close()
        return time.perf_counter() - t0


def main() -> None:
    size = int(os.environ.get("BENCH_SIZE_MIB", "1024")) * MiB
    rng = random.Random(1)
    blocks = size // BS
    data_blocks = sorted(rng.sample(range(blocks), int(blocks * 0.6)))
    change = sorted(rng.sample(range(blocks), max(1, blocks // 20)))
    out: dict[str, object] = {"size_mib": size // MiB, "changed_blocks": len(change)}
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-", dir="."))
    try:
        plain = Bench(work / "plain", size)
        plain.session("full", data_blocks, rng, commit=False)
        out["incr_without_point_s"] = round(plain.session("incr", change, rng, commit=False), 3)
        b = Bench(work / "points", size)
        out["full_s"] = round(b.session("full", data_blocks, rng), 3)
        out["incr_with_point_s"] = round(b.session("incr1", change, rng), 3)
        b.session("incr2", sorted(rng.sample(range(blocks), len(change))), rng)
        out["incr_cost_ratio"] = round(float(out["incr_with_point_s"]) / float(out["incr_without_point_s"]), 2)  # type: ignore[arg-type]
        points = restore_points.list_points(b.vm)
        out["read_newest_point_s"] = round(b.read_point(points[-1].id), 3)
        out["read_oldest_point_s"] = round(b.read_point(points[0].id), 3)
        t0 = time.perf_counter()
        restore_points.delete(b.vm, points[1].id, guard=b.guard)
        out["fold_middle_point_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        restore_points.delete(b.vm, points[0].id, guard=b.guard)
        out["delete_oldest_point_s"] = round(time.perf_counter() - t0, 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in out.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
