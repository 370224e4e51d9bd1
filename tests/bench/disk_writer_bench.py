"""Write throughput of the replica disk writers: VHDX against raw, BENCH_MIB (default 1024) MiB in 1 MiB writes.

Each writer gets a new disk of that size and the same random 1 MiB blocks (a few distinct ones, so the data
is not made while timing), written in order with a flush every 64 MiB (as the target flushes while
committing) and one at the end; then the same again over the allocated disk (in-place overwrites, as an
incremental does). Prints one JSON line: the median MB/s per writer and pass over BENCH_REPEAT (4) runs. Run:
`.venv/bin/python -m tests.bench.disk_writer_bench` (numbers in docs/target-agent.md, "Replica disk formats").
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from vmrepl.disk import create_writer, open_writer
from vmrepl.domain import DiskFormat
from vmrepl.extent import MiB

FLUSH_EVERY = 64
REPEAT = int(os.environ.get("BENCH_REPEAT", "4"))


def one_pass(fmt: DiskFormat, path: Path, blocks: list[bytes], total: int, *, fresh: bool) -> float:
    start = time.perf_counter()
    w = create_writer(fmt, path, size=total * MiB) if fresh else open_writer(fmt, path)
    with w:
        for i in range(total):
            w.write(blocks[i % len(blocks)], i * MiB)
            if i % FLUSH_EVERY == FLUSH_EVERY - 1:
                w.flush()
        w.flush()
    return total * MiB / 1e6 / (time.perf_counter() - start)


def main() -> None:
    total = int(os.environ.get("BENCH_MIB", "1024"))
    rng = random.Random(0)
    blocks = [rng.randbytes(MiB) for _ in range(8)]
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        for rep in range(REPEAT):  # alternating which goes first, so neither always meets a warmer cache
            order = (DiskFormat.RAW, DiskFormat.VHDX) if rep % 2 == 0 else (DiskFormat.VHDX, DiskFormat.RAW)
            for fmt in order:
                path = Path(d) / f"disk.{fmt}"
                runs.setdefault(f"{fmt}_new_mb_s", []).append(one_pass(fmt, path, blocks, total, fresh=True))
                runs.setdefault(f"{fmt}_overwrite_mb_s", []).append(one_pass(fmt, path, blocks, total, fresh=False))
                path.unlink()
    print(json.dumps({"mib": total, "runs": REPEAT, **{k: round(statistics.median(v), 1) for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
