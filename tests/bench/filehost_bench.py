"""The file provider's cost per session: the provider calls one session makes, on a host of N VMs.

For each VM a session asks for it by reference at planning, lists its checkpoints, asks for it again,
creates a checkpoint, asks for each disk's changed ranges and removes the checkpoint (controller/engine/session.py
and task.py). This runs those calls for every VM of a host of BENCH_VMS VMs (default 100), one disk of
1 MiB each (the data path is not what is measured), and prints the CPU and wall time they took, as one
JSON line. Run: `.venv/bin/python -m tests.bench.filehost_bench`.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from controller import lab
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider


async def one_session(provider: FileHostProvider, refs: list[str]) -> int:
    calls = 0
    for ref in refs:
        vm = await provider.get_vm(ref)  # planning
        await provider.list_checkpoints(vm.vm_id)  # orphans
        await provider.get_vm(vm.vm_id)
        cp = await provider.create_checkpoint(vm.vm_id)
        for d in vm.disks:
            await provider.changed_ranges(cp, d.disk_id, cp.reference)
        await provider.remove_checkpoint(vm.vm_id, cp.checkpoint_id)
        calls += 5 + len(vm.disks)
    return calls


def main() -> None:
    count = int(os.environ.get("BENCH_VMS", "100"))
    with tempfile.TemporaryDirectory() as work:
        host = Path(work) / "host"
        refs = [f"vm{i:03d}" for i in range(count)]
        for i, name in enumerate(refs):
            lab.create_raw_vm(host, name, size=MiB, seed=i + 1)
        provider = FileHostProvider(host)  # one per session, as the engine makes them
        cpu, wall = time.process_time(), time.perf_counter()
        calls = asyncio.run(one_session(provider, refs))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"vms": count, "calls": calls, "cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3)}))


if __name__ == "__main__":
    main()
