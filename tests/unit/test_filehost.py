"""The file-backed provider and the lab's sample VM, checked with real tools."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from controller import lab
from tests.conftest import need_tool
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound
from vmrepl.extent import Extent, MiB
from vmrepl.providers.filehost import FileHostProvider

SECTOR = 512


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("sfdisk", "mkntfs", "ntfscp", "mkswap"):
        need_tool(tool)
    root = tmp_path_factory.mktemp("host")
    lab.create_sample_vm(root, "web01", size=128 * MiB)
    return root


@pytest.fixture
def host(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "host"
    subprocess.run(["cp", "-a", "--sparse=always", str(template), str(root)], check=True)
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sample_vm_has_real_ntfs_and_swap(template: Path, tmp_path: Path) -> None:
    need_tool("ntfsls")
    disk = template / "web01" / "disk0.raw"
    data, swap = lab.partitions(disk)
    assert data["type"] == lab.GPT_BASIC_DATA and swap["type"] == lab.GPT_LINUX_SWAP
    raw = disk.read_bytes()
    start = int(str(data["start"])) * SECTOR
    assert raw[start + 3 : start + 11] == b"NTFS    "
    part = tmp_path / "ntfs.img"
    part.write_bytes(raw[start : start + int(str(data["size"])) * SECTOR])
    listing = subprocess.run(["ntfsls", "-f", str(part)], capture_output=True, text=True, check=True).stdout
    assert {"pagefile.sys", "data.bin", "notes0.txt"} <= set(listing.split())
    swap_start = int(str(swap["start"])) * SECTOR
    assert raw[swap_start + 4096 - 10 : swap_start + 4096] == b"SWAPSPACE2"


async def test_vms_by_id_and_name(host: Path) -> None:
    p = FileHostProvider(host)
    [vm] = await p.list_vms()
    assert (await p.get_vm(vm.vm_id)).name == "web01" == (await p.get_vm("web01")).name
    assert vm.disks[0].size == 128 * MiB and vm.disks[0].format == "raw"
    with pytest.raises(NotFound):
        await p.get_vm("nope")
    assert b'name = "web01"' in await p.vm_configuration(vm.vm_id)


async def test_checkpoint_freezes_the_disk_and_removal_merges(host: Path) -> None:
    p = FileHostProvider(host)
    vm = p.vm("web01")
    disk = vm.image("disk0")
    cp = await p.create_checkpoint("web01")
    frozen = sha(disk)
    vm.write("disk0", 5 * MiB, b"\x42" * MiB)
    assert sha(disk) == frozen  # the proxy reads the base: unchanged while the checkpoint exists
    assert cp.disk("disk0").locator == str(disk)
    assert vm.read_current("disk0", 5 * MiB, MiB) == b"\x42" * MiB
    with pytest.raises(FailedPrecondition, match="already has checkpoint"):
        await p.create_checkpoint("web01")
    assert [c.checkpoint_id for c in await p.list_checkpoints("web01")] == [cp.checkpoint_id]
    await p.remove_checkpoint("web01", cp.checkpoint_id)
    await p.remove_checkpoint("web01", cp.checkpoint_id)  # idempotent
    assert disk.read_bytes()[5 * MiB : 6 * MiB] == b"\x42" * MiB
    assert not list((host / "web01" / ".vmrepl" / "overlay").iterdir())
    assert await p.list_checkpoints("web01") == []


async def test_changed_ranges_since_a_reference(host: Path) -> None:
    p = FileHostProvider(host)
    vm = p.vm("web01")
    cp1 = await p.create_checkpoint("web01")
    vm.write("disk0", 0, b"a" * 4096)  # during cp1: belongs to the next interval
    await p.remove_checkpoint("web01", cp1.checkpoint_id)
    vm.write("disk0", 10 * MiB, b"b" * MiB)
    cp2 = await p.create_checkpoint("web01")
    vm.write("disk0", 20 * MiB, b"c" * 100)  # after cp2: not in its changes
    assert await p.changed_ranges(cp2, "disk0", cp1.reference) == [Extent(0, 4096), Extent(10 * MiB, MiB)]
    assert await p.changed_ranges(cp2, "disk0", cp2.reference) == []
    assert await p.changed_ranges(cp2, "disk0", "rct:unknown") is None
    await p.remove_checkpoint("web01", cp2.checkpoint_id)
    cp3 = await p.create_checkpoint("web01")
    assert await p.changed_ranges(cp3, "disk0", cp2.reference) == [Extent(20 * MiB, 100)]


async def test_an_interrupted_merge_is_finished_before_anything_else(host: Path) -> None:
    p = FileHostProvider(host)
    vm = p.vm("web01")
    cp = await p.create_checkpoint("web01")
    vm.write("disk0", MiB, b"z" * 8192)
    state = host / "web01" / ".vmrepl" / "checkpoint.json"
    raw = json.loads(state.read_text())
    raw["state"] = "merging"  # as if the controller died in the middle of removing it
    state.write_text(json.dumps(raw))
    assert await p.list_checkpoints("web01") == []
    cp2 = await p.create_checkpoint("web01")
    assert cp2.checkpoint_id != cp.checkpoint_id
    assert vm.image("disk0").read_bytes()[MiB : MiB + 8192] == b"z" * 8192


def test_manifest_errors_name_the_field(host: Path) -> None:
    bad = host / "bad"
    bad.mkdir()
    for text, field in [
        ('name = "x"\nid = "1"\n[[disks]]\nid = "../d"\npath = "d.raw"\n', "id"),
        ('name = "x"\nid = "1"\n[[disks]]\nid = "d"\npath = "../d.raw"\n', "path"),
        ('name = "x"\nid = "1"\ndisks = []\n', "disks"),
    ]:
        (bad / "vm.toml").write_text(text)
        with pytest.raises(InvalidArgument, match=field):
            FileHostProvider(host).vm("x")


def test_writes_outside_the_disk_are_refused(host: Path) -> None:
    vm = FileHostProvider(host).vm("web01")
    with pytest.raises(InvalidArgument):
        vm.write("disk0", 128 * MiB - 10, b"x" * 100)
