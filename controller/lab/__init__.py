"""Lab helpers: sample disk images, agent configs and agent processes on loopback.

Used by `make demo`, the integration tests and `make bench`; the controller
issue grows this into `vmrepl lab`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmrepl.block import is_zero
from vmrepl.extent import MiB
from vmrepl.security import certs


def _text_corpus(limit: int = 8 * MiB) -> bytes:
    """Python's own standard library source: realistic, compressible text (as in perf-notes.md)."""
    out = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out)


def make_mixed_image(path: Path, size: int, *, seed: int = 1, block: int = MiB) -> dict[str, int]:
    """A raw image of `size` bytes: 30% zero blocks (half written, half holes), 40% text, 30% random.

    Returns the count of blocks of each kind.
    """
    rng = random.Random(seed)
    blocks = size // block
    kinds = ["zero"] * (blocks * 3 // 10) + ["text"] * (blocks * 4 // 10)
    kinds += ["random"] * (blocks - len(kinds))
    rng.shuffle(kinds)
    corpus = _text_corpus()
    counts = {"zero": 0, "hole": 0, "text": 0, "random": 0}
    with open(path, "wb") as f:
        f.truncate(size)
        for i, kind in enumerate(kinds):
            if kind == "zero":
                if rng.random() < 0.5:
                    counts["hole"] += 1
                    continue
                data = bytes(block)
            elif kind == "text":
                start = rng.randrange(0, len(corpus) - block)
                data = corpus[start : start + block]
            else:
                data = rng.randbytes(block)
            counts[kind] += 1
            f.seek(i * block)
            f.write(data)
    return counts


def change_blocks(path: Path, *, fraction: float, seed: int = 2, block: int = MiB) -> list[int]:
    """Overwrite `fraction` of the image's blocks with new random bytes; returns their offsets."""
    rng = random.Random(seed)
    size = path.stat().st_size
    picked = sorted(rng.sample(range(size // block), max(1, int(size // block * fraction))))
    with open(path, "r+b") as f:
        for i in picked:
            f.seek(i * block)
            f.write(rng.randbytes(block))
    return [i * block for i in picked]


@dataclass
class LabCerts:
    directory: Path

    @classmethod
    def create(cls, directory: Path) -> LabCerts:
        if not (directory / "ca.pem").exists():
            certs.init(directory, list(certs.DEFAULT_HOSTS))
            # A read-only API client, for trying (and testing) the reader role.
            certs.issue(directory, name="reader", role="reader", hosts=list(certs.DEFAULT_HOSTS))
        return cls(directory)

    def tls(self, name: str) -> dict[str, str]:
        d = self.directory
        return {
            "ca_file": str(d / "ca.pem"),
            "cert_file": str(d / f"{name}.pem"),
            "key_file": str(d / f"{name}.key"),
        }

    @property
    def signing_key(self) -> Path:
        return self.directory / "controller-signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.directory / "controller-signing.pub"


def _toml(value: object, *, inline: bool = False) -> str:
    if isinstance(value, dict):
        if not inline:
            raise TypeError("nested tables are written by write_toml")
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v, inline=True)}" for k, v in value.items()) + "}"
    if isinstance(value, list):  # a list of tables (host_paths) as inline tables
        return "[" + ", ".join(_toml(v, inline=True) for v in value) + "]"
    return json.dumps(value)  # JSON strings, numbers and booleans are valid TOML


def write_toml(path: Path, data: dict[str, object]) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *(f"{kk} = {_toml(vv)}" for kk, vv in v.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def target_config(
    work: Path, lab: LabCerts, *, listen: str = "127.0.0.1:0", level: str = "info", **extra: object
) -> Path:
    return write_toml(
        work / "target.toml",
        {
            "listen": listen,
            "name": "target",
            "datastore_root": str(work / "datastore"),
            "controller_public_keys": [str(lab.signing_pub)],
            **extra,
            "tls": lab.tls("target"),
            "log": {"level": level, "format": "json"},
        },
    )


def proxy_config(
    work: Path, lab: LabCerts, *, sources: Path, listen: str = "127.0.0.1:0", name: str = "proxy", **extra: object
) -> Path:
    return write_toml(
        work / f"{name}.toml",
        {
            "listen": listen,
            "name": name,
            "source_roots": [str(sources)],
            **extra,
            "tls": lab.tls("proxy"),
            "log": {"level": "info", "format": "json"},
        },
    )


def controller_config(
    work: Path, lab: LabCerts, *, listen: str = "127.0.0.1:0", level: str = "info", **extra: object
) -> Path:
    return write_toml(
        work / "controller.toml",
        {
            "listen": listen,
            "data_dir": str(work / "controller"),
            "signing_key": str(lab.signing_key),
            **extra,
            "tls": lab.tls("controller"),
            "log": {"level": level, "format": "json"},
        },
    )


# Every AgentProcess running in this program, so that nothing it started outlives it: a test harness stops
# what a test left (tests/conftest.py), and the atexit hook below stops the rest when the program exits.
_RUNNING: set[AgentProcess] = set()


def running_agents() -> list[AgentProcess]:
    """The agent processes this program started that are still running."""
    return [p for p in list(_RUNNING) if p.running]


def start_all(processes: Sequence[AgentProcess], timeout: float = 30.0) -> None:
    """Launch every process, then wait for each to listen: their start-ups overlap. If one fails, those
    started are stopped and the error is raised."""
    try:
        for p in processes:
            p.launch()
        for p in processes:
            p.wait_started(timeout)
    except BaseException:
        for p in processes:
            p.stop()
        raise


def stop_all(timeout: float = 10.0) -> list[AgentProcess]:
    """Stop every agent process this program started and has not stopped yet; returns those it stopped."""
    left = running_agents()
    for p in left:
        p.stop(timeout)
    _RUNNING.clear()
    return left


atexit.register(stop_all)


@dataclass(eq=False)  # identity, not field equality: the registry holds each process object once
class AgentProcess:
    """An agent daemon as a child process, its JSON log in a file.

    It runs in its own process group, so stopping or killing it reaches anything it started; while it
    runs it is in the registry that `stop_all` (and the atexit hook) stops.
    """

    module: str
    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    _seen: int = 0  # the log's size at launch: "listening" is looked for after it

    def start(self, timeout: float = 30.0) -> int:
        self.launch()
        return self.wait_started(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it to listen (`wait_started` does): start_all launches
        several this way, so their start-ups (imports, migrations) overlap."""
        if self.running:
            raise RuntimeError(f"{self.module} is already running (pid {self.pid}); stop or kill it first")
        env = {**os.environ, **self.env}
        self._seen = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _RUNNING.add(self)

    def wait_started(self, timeout: float = 30.0) -> int:
        """The port the launched process listens on, once it says so; a process that fails to start is
        killed (with anything it started) and the error names its log."""
        try:
            self.port = self._wait_listening(self._seen, timeout)
        except BaseException:
            self.kill()  # never leave a process that failed to start behind
            raise
        return self.port

    def _wait_listening(self, seen: int, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(since=seen):
                if event.get("event") == "listening":
                    return int(str(event["port"]))
            if not self.running:
                code = self.proc.wait()
                raise RuntimeError(f"{self.module} exited with {code}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.module} did not start listening within {timeout}s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the agent has not exited. Unlike Popen.poll this does not reap it: a zombie keeps its pid,
        and so its process group's id, reserved until `_end` has signalled the group."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False  # reaped already (someone called Popen.wait or poll)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def events(self, since: int = 0) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        out = []
        with open(self.log_path, "rb") as f:
            f.seek(since)
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline:
                time.sleep(0.02)
        return self._end()

    def kill(self) -> None:
        """kill -9 of the agent and everything it started."""
        if self.proc is not None:
            self._end()

    def _end(self) -> int:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group: the agent, its children
        _RUNNING.discard(self)
        return self.proc.wait()


GPT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
GPT_LINUX_SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
SECTOR = 512


def _run(*cmd: str, stdin: str | None = None) -> str:
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy `src` into `dst` at `offset`, leaving all-zero MiB chunks as holes."""
    with open(src, "rb") as f, open(dst, "r+b") as g:
        pos = 0
        while chunk := f.read(MiB):
            if not is_zero(chunk):
                g.seek(offset + pos)
                g.write(chunk)
            pos += len(chunk)


def partitions(image: Path) -> list[dict[str, object]]:
    """The image's partition table as sfdisk reports it (start and size in sectors)."""
    table = json.loads(_run("sfdisk", "--json", str(image)))["partitiontable"]
    parts: list[dict[str, object]] = table["partitions"]
    return parts


def add_raw_disk(vm_dir: Path, disk_id: str, size: int, *, seed: int = 1) -> Path:
    """Add a raw disk of mixed content (zero, text, random blocks) to a VM folder's manifest."""
    from vmrepl.providers.filehost import DiskManifest, load_manifest, write_manifest

    path = vm_dir / f"{disk_id}.raw"
    make_mixed_image(path, size, seed=seed)
    manifest = load_manifest(vm_dir)
    manifest.disks.append(DiskManifest(id=disk_id, path=path.name))
    write_manifest(vm_dir, manifest)
    return path


def create_raw_vm(host_root: Path, name: str, *, size: int, seed: int = 1) -> Path:
    """A VM folder with one raw disk of mixed content (no partitions): quick to make, for tests."""
    from vmrepl.providers.filehost import DiskManifest, VmManifest, write_manifest

    vm_dir = host_root / name
    vm_dir.mkdir(parents=True)
    make_mixed_image(vm_dir / "disk0.raw", size, seed=seed)
    # The seed makes the content, never the id: two VMs made alike must not share an id (checkpoints and
    # replicas are keyed by it).
    vm_id = str(uuid.uuid4())
    write_manifest(vm_dir, VmManifest(name=name, id=vm_id, disks=[DiskManifest(id="disk0", path="disk0.raw")]))
    return vm_dir


def create_sample_vm(host_root: Path, name: str, *, size: int = 256 * MiB, seed: int = 1) -> Path:
    """A VM folder with one GPT disk: an NTFS data partition with files (text, binaries, a pagefile)
    made by mkntfs and ntfscp, and a swap partition made by mkswap with used pages. Returns the folder."""
    from vmrepl.providers.filehost import DiskManifest, VmManifest, write_manifest

    vm_dir = host_root / name
    vm_dir.mkdir(parents=True)
    disk = vm_dir / "disk0.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    swap_bytes = 32 * MiB
    data_sectors = (size - swap_bytes - 2 * MiB) // SECTOR
    _run(
        "sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(disk),
        stdin=f"label: gpt\nstart=2048, size={data_sectors}, type={GPT_BASIC_DATA}, name=data\n"
        f"type={GPT_LINUX_SWAP}, name=swap\n",
    )  # fmt: skip
    data, swap = partitions(disk)
    rng = random.Random(seed)
    work = vm_dir / ".build"
    work.mkdir()
    try:
        ntfs = work / "ntfs.img"
        with open(ntfs, "wb") as f:
            f.truncate(int(str(data["size"])) * SECTOR)
        _run("mkntfs", "-F", "-Q", "-q", "-L", "data", "-p", str(data["start"]), "-H", "255", "-S", "63", str(ntfs))
        files = {"pagefile.sys": rng.randbytes(16 * MiB), "data.bin": rng.randbytes(8 * MiB)}
        corpus = _text_corpus(4 * MiB)
        for i in range(8):
            files[f"notes{i}.txt"] = corpus[i * 256 * 1024 : (i + 1) * 256 * 1024]
        for fname, content in files.items():
            src = work / fname
            src.write_bytes(content)
            _run("ntfscp", "-f", "-q", str(ntfs), str(src), f"/{fname}")
        _copy_sparse(ntfs, disk, int(str(data["start"])) * SECTOR)
        swap_img = work / "swap.img"
        with open(swap_img, "wb") as f:
            f.truncate(int(str(swap["size"])) * SECTOR)
        _run("mkswap", "-q", "-L", "swap", str(swap_img))
        with open(swap_img, "r+b") as f:  # pages the guest swapped out
            f.seek(MiB)
            f.write(rng.randbytes(4 * MiB))
        _copy_sparse(swap_img, disk, int(str(swap["start"])) * SECTOR)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_manifest(
        vm_dir,
        VmManifest(
            name=name,
            id=str(uuid.uuid4()),  # random whatever the seed: ids are unique on a host
            disks=[DiskManifest(id="disk0", path="disk0.raw")],
        ),
    )
    return vm_dir
