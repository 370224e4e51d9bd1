"""The file-backed provider and the lab's sample VM, checked with real tools."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from controller import lab
from tests.conftest import need_tool
from tests.powercut import Recorder
from vmrepl.errors import DiskError, FailedPrecondition, InvalidArgument, NotFound
from vmrepl.extent import Extent, MiB
from vmrepl.providers.base import Untracked
from vmrepl.providers.filehost import DiskManifest, FileHostProvider, VmManifest, load_manifest, write_manifest

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
    assert isinstance(await p.changed_ranges(cp2, "disk0", "rct:unknown"), Untracked)
    await p.remove_checkpoint("web01", cp2.checkpoint_id)
    cp3 = await p.create_checkpoint("web01")
    assert await p.changed_ranges(cp3, "disk0", cp2.reference) == [Extent(20 * MiB, 100)]


async def test_an_interrupted_merge_is_finished_before_anything_else(host: Path) -> None:
    p = FileHostProvider(host)
    vm = p.vm("web01")
    cp = await p.create_checkpoint("web01")
    vm.write("disk0", MiB, b"z" * 8192)
    with vm._state() as s:  # as if the controller died in the middle of removing it
        current = vm._record(s)
        assert current is not None
        vm._save(s, current.model_copy(update={"state": "merging"}))
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


# ---- ids, names and the index (issue 9, items 3 and 4) -------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A host with two small raw VMs, a and b."""
    root = tmp_path / "small"
    lab.create_raw_vm(root, "a", size=4 * MiB, seed=1)
    lab.create_raw_vm(root, "b", size=4 * MiB, seed=1)
    return root


def _rename(vm_dir: Path, **fields: str) -> None:
    write_manifest(vm_dir, load_manifest(vm_dir).model_copy(update=fields))


def test_lab_vms_made_alike_get_their_own_ids(small: Path) -> None:
    assert load_manifest(small / "a").id != load_manifest(small / "b").id


def test_a_shared_id_is_refused_naming_both_folders(small: Path) -> None:
    _rename(small / "b", id=load_manifest(small / "a").id)
    p = FileHostProvider(small)
    for ref in ("a", "b", load_manifest(small / "a").id):
        with pytest.raises(FailedPrecondition, match=r"used by more than one folder.*: a, b"):
            p.vm(ref)
    with pytest.raises(FailedPrecondition, match="a, b"):
        p.check_unique_ids()
    assert asyncio.run(p.list_vms()) == []  # neither is listed as if it were usable


def test_references_resolve_by_id_first_then_by_a_unique_name(small: Path) -> None:
    a_id = load_manifest(small / "a").id
    _rename(small / "b", name=a_id)  # b's name is a's id: the id wins
    p = FileHostProvider(small)
    assert p.vm(a_id).folder == "a"
    _rename(small / "b", name="a")  # two folders named a: ambiguous, by name only
    with pytest.raises(FailedPrecondition, match=r"ambiguous.*folder a \(id .*folder b \(id "):
        p.vm("a")
    assert p.vm(load_manifest(small / "b").id).folder == "b"
    with pytest.raises(NotFound):
        p.vm("c")


_TWO_DISKS = 'name = "bad"\nid = "x"\n[[disks]]\nid = "{}"\npath = "{}"\n[[disks]]\nid = "{}"\npath = "{}"\n'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('name = "bad"\nid = \n', "not valid TOML"),
        ('name = "bad"\nid = "x"\ncolour = "blue"\n[[disks]]\nid = "d"\npath = "d.raw"\n', "colour"),
        ('name = "bad"\nid = "x"\n[[disks]]\nid = "d"\npath = "../../etc/passwd"\n', "path"),
        (
            'name = "bad"\nid = "x"\n[[disks]]\nid = "d"\npath = "a.raw"\n[[disks]]\nid = "d"\npath = "b.raw"\n',
            "id d is",
        ),
        (
            'name = "bad"\nid = "x"\n[[disks]]\nid = "d"\npath = "a.raw"\n[[disks]]\nid = "e"\npath = "a.raw"\n',
            "a.raw is",
        ),
    ],
)
def test_a_bad_manifest_fails_only_its_own_vm(small: Path, text: str, reason: str) -> None:
    (small / "bad").mkdir()
    (small / "bad" / "vm.toml").write_text(text)
    p = FileHostProvider(small)
    assert p.vm("a").manifest.name == "a"  # the others are found as before
    with pytest.raises(InvalidArgument, match=reason):
        p.vm("bad")  # by its folder's name (or the name or id its manifest gives)
    assert reason in p.problems()["bad"]
    assert sorted(v.name for v in asyncio.run(p.list_vms())) == ["a", "b"]


def test_a_disk_outside_the_vm_folder_fails_only_its_vm(small: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.raw").write_bytes(b"\x01" * 4096)
    (small / "b" / "disk0.raw").unlink()
    (small / "b" / "disk0.raw").symlink_to(tmp_path / "elsewhere.raw")
    p = FileHostProvider(small)
    with pytest.raises(FailedPrecondition, match=r"disk0\.raw is a symbolic link"):
        asyncio.run(p.get_vm("b"))
    assert asyncio.run(p.get_vm("a")).name == "a"


def test_the_index_parses_a_manifest_once_until_it_changes(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(30):
        (root / f"vm{i:02d}").mkdir(parents=True)
        write_manifest(
            root / f"vm{i:02d}",
            VmManifest(name=f"vm{i:02d}", id=f"id-{i}", disks=[DiskManifest(id="disk0", path="disk0.raw")]),
        )
    p = FileHostProvider(root)
    for _ in range(5):
        for i in range(30):
            assert p.vm(f"id-{i}").folder == f"vm{i:02d}"
    assert p.index.parses == 30  # once each, not once per lookup per VM (4,500 before)
    _rename(root / "vm07", name="renamed")
    assert p.vm("renamed").folder == "vm07"
    assert p.index.parses == 31  # only the changed one again
    shutil.rmtree(root / "vm08")
    with pytest.raises(NotFound):
        p.vm("id-8")


# ---- planted files and symbolic links (issue 9, item 5) ------------------------------------------------


def _plant_merge(vm_dir: Path, secret: Path, record: dict[str, object] | None = None) -> None:
    """What an attacker who can write the VM folder leaves: a merge in progress of an overlay that is a
    link to a file only root may read."""
    state = vm_dir / ".vmrepl"
    (state / "overlay").mkdir(parents=True, exist_ok=True)
    raw = record or {"id": "0" * 31 + "1", "created_at": 0, "reference": 0, "state": "merging"}
    (state / "checkpoint.json").write_text(json.dumps(raw))
    (state / "overlay" / "disk0.map").write_text(f"[0, {secret.stat().st_size}]\n")
    (state / "overlay" / "disk0.raw").unlink(missing_ok=True)
    (state / "overlay" / "disk0.raw").symlink_to(secret)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    s = tmp_path / "shadow"
    s.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 20)
    s.chmod(0o400)
    return s


def test_a_planted_merge_record_is_refused_and_nothing_is_read(small: Path, secret: Path) -> None:
    _plant_merge(small / "a", secret)
    p = FileHostProvider(small)
    before = sha(small / "a" / "disk0.raw")
    for call in (
        lambda: asyncio.run(p.list_checkpoints("a")),
        lambda: asyncio.run(p.create_checkpoint("a")),
        lambda: p.vm("a").write("disk0", 0, b"x"),
        lambda: asyncio.run(p.remove_checkpoint("a", "0" * 31 + "1")),
    ):
        with pytest.raises(FailedPrecondition, match=r"checkpoint\.json was not written by vmrepl"):
            call()
    assert sha(small / "a" / "disk0.raw") == before


def test_records_are_sealed_per_host_and_per_vm(small: Path, secret: Path) -> None:
    p = FileHostProvider(small)
    cp = asyncio.run(p.create_checkpoint("a"))
    sealed = json.loads((small / "a" / ".vmrepl" / "checkpoint.json").read_text())
    assert set(sealed) == {"record", "seal"} and sealed["record"]["id"] == cp.checkpoint_id
    tampered = {**sealed, "record": {**sealed["record"], "state": "merging"}}
    (small / "a" / ".vmrepl" / "checkpoint.json").write_text(json.dumps(tampered))
    with pytest.raises(FailedPrecondition, match="its seal does not match"):
        asyncio.run(p.list_checkpoints("a"))
    # A record sealed for a, copied into b with an overlay of b's pointing at the secret: refused too.
    (small / "a" / ".vmrepl" / "checkpoint.json").write_text(json.dumps(sealed))
    _plant_merge(small / "b", secret)
    shutil.copy(small / "a" / ".vmrepl" / "checkpoint.json", small / "b" / ".vmrepl" / "checkpoint.json")
    with pytest.raises(FailedPrecondition, match="belongs to VM"):
        asyncio.run(p.list_checkpoints("b"))
    assert [c.checkpoint_id for c in asyncio.run(FileHostProvider(small).list_checkpoints("a"))] == [cp.checkpoint_id]
    key = small / ".vmrepl-host" / "checkpoint.key"
    assert key.stat().st_mode & 0o077 == 0 and len(key.read_bytes()) == 32


def test_a_deleted_host_key_is_written_back_and_a_replaced_one_refused(small: Path) -> None:
    """Found in review: with the key deleted under a running controller, new records were sealed with a key
    no file held, and after a restart every VM with a checkpoint was refused, its overlay's acknowledged
    guest writes stranded."""
    p = FileHostProvider(small)
    asyncio.run(p.create_checkpoint("a"))
    key_dir = small / ".vmrepl-host"
    shutil.rmtree(key_dir)
    cp_b = asyncio.run(p.create_checkpoint("b"))  # sealing checks the file: the key is written back
    fresh = FileHostProvider(small)  # as after a restart
    assert len(asyncio.run(fresh.list_checkpoints("a"))) == 1
    assert [c.checkpoint_id for c in asyncio.run(fresh.list_checkpoints("b"))] == [cp_b.checkpoint_id]
    (key_dir / "checkpoint.key").write_bytes(os.urandom(32))
    with pytest.raises(FailedPrecondition, match="changed while vmrepl was running"):
        asyncio.run(p.remove_checkpoint("b", cp_b.checkpoint_id))
    shutil.rmtree(key_dir)
    with pytest.raises(FailedPrecondition, match=r"or its key was deleted.*put it back from a backup"):
        asyncio.run(FileHostProvider(small).list_checkpoints("a"))


def test_an_overlay_swapped_for_a_link_is_refused_at_merge(small: Path, secret: Path, tmp_path: Path) -> None:
    p = FileHostProvider(small)
    vm = p.vm("a")
    cp = asyncio.run(p.create_checkpoint("a"))
    vm.write("disk0", 0, b"g" * 4096)
    overlay = small / "a" / ".vmrepl" / "overlay" / "disk0.raw"
    overlay.unlink()
    overlay.symlink_to(secret)
    with pytest.raises(FailedPrecondition, match=r"disk0\.raw is a symbolic link"):
        asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))
    overlay.unlink()
    os.link(tmp_path / "shadow", overlay)  # a hard link to it, as root could make
    with pytest.raises(FailedPrecondition, match="other hard links"):
        asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))
    assert secret.read_bytes()[:16] not in vm.image("disk0").read_bytes()


def test_lookups_create_nothing_and_linked_folders_are_refused(small: Path, tmp_path: Path) -> None:
    p = FileHostProvider(small)
    asyncio.run(p.list_vms())
    asyncio.run(p.list_checkpoints("a"))
    vm = p.vm("b")
    vm.read_current("disk0", 0, 4096)
    assert asyncio.run(p.vm_configuration("b")).startswith(b"name")
    assert not list(small.glob("*/.vmrepl")) and not (small / ".vmrepl-host").exists()

    outside = tmp_path / "outside"
    outside.mkdir()
    (small / "a" / ".vmrepl").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FailedPrecondition, match=r"\.vmrepl is a symbolic link"):
        asyncio.run(p.create_checkpoint("a"))
    lab.create_raw_vm(tmp_path / "far", "c", size=MiB)
    (small / "c").symlink_to(tmp_path / "far" / "c", target_is_directory=True)
    with pytest.raises(FailedPrecondition, match="c is a symbolic link"):
        asyncio.run(p.create_checkpoint("c"))
    (small / "b" / "vm.toml").rename(small / "b" / "real.toml")
    (small / "b" / "vm.toml").symlink_to(small / "b" / "real.toml")
    with pytest.raises(FailedPrecondition, match=r"vm\.toml is a symbolic link"):
        p.vm("b")
    assert list(outside.iterdir()) == [] and not (tmp_path / "far" / "c" / ".vmrepl").exists()


# ---- durability of guest writes under a checkpoint (issue 9, item 16) ----------------------------------

WRITES = [(0, b"\x11" * 5000), (MiB + 17, b"\x22" * 70000), (3 * MiB, b"\x33" * 4096), (100, b"\x44" * 300)]


def _guest_view(data: bytearray, acked: int) -> bytearray:
    for offset, chunk in WRITES[:acked]:
        data[offset : offset + len(chunk)] = chunk
    return data


def _writes_then_merge(root: Path, stop_at: int) -> tuple[int, bool, int]:
    """Writes under a checkpoint, then its removal, with a power cut before sync `stop_at` (0: none).
    Returns the writes acknowledged, whether the removal returned, and how many syncs there were."""
    p = FileHostProvider(root)
    vm = p.vm("a")
    cp = asyncio.run(p.create_checkpoint("a"))
    acked, removed = 0, False
    with Recorder(root, stop_at=stop_at) as rec:
        for offset, chunk in WRITES:
            vm.write("disk0", offset, chunk)
            acked += 1
        asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))
        removed = True
    if stop_at:
        rec.cut()
    return acked, removed, rec.syncs


def test_acknowledged_writes_survive_a_power_cut_at_every_sync(tmp_path: Path) -> None:
    template = tmp_path / "template"
    lab.create_raw_vm(template, "a", size=4 * MiB, seed=3)
    base = bytearray((template / "a" / "disk0.raw").read_bytes())
    root = tmp_path / "run"
    shutil.copytree(template, root)
    _, _, total = _writes_then_merge(root, 0)
    assert (root / "a" / "disk0.raw").read_bytes() == _guest_view(bytearray(base), len(WRITES))
    for n in range(1, total + 1):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        acked, removed, _ = _writes_then_merge(root, n)
        want = _guest_view(bytearray(base), acked)
        p = FileHostProvider(root)  # after the restart
        vm = p.vm("a")
        seen = vm.read_current("disk0", 0, 4 * MiB)
        inflight = acked < len(WRITES) and bytes(_guest_view(bytearray(base), acked + 1)) == seen
        got = bytes(want) == seen or inflight  # the write in flight at the cut may show or not
        assert got, f"cut at sync {n}: the guest lost an acknowledged write ({acked} acknowledged)"
        for cp in asyncio.run(p.list_checkpoints("a")):
            asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))
        asyncio.run(p.create_checkpoint("a"))  # finishes a merge the cut interrupted
        disk = (root / "a" / "disk0.raw").read_bytes()
        assert disk == seen, f"cut at sync {n}: the merge differs from what the guest saw"
        if removed:
            assert disk == bytes(_guest_view(bytearray(base), len(WRITES)))


def test_a_torn_map_line_is_left_out_and_cut_before_the_next_append(small: Path) -> None:
    p = FileHostProvider(small)
    vm = p.vm("a")
    cp = asyncio.run(p.create_checkpoint("a"))
    vm.write("disk0", 0, b"\x55" * 4096)
    overlay_map = small / "a" / ".vmrepl" / "overlay" / "disk0.map"
    with open(overlay_map, "ab") as m:
        m.write(b"[8192, 40")  # a crash in the middle of an append
    assert vm.read_current("disk0", 0, 4096) == b"\x55" * 4096
    vm.write("disk0", MiB, b"\x66" * 4096)
    assert overlay_map.read_bytes().splitlines() == [b"[0, 4096]", b"[1048576, 4096]"]
    asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))
    disk = (small / "a" / "disk0.raw").read_bytes()
    assert disk[:4096] == b"\x55" * 4096 and disk[MiB : MiB + 4096] == b"\x66" * 4096


def test_a_damaged_map_line_is_refused(small: Path) -> None:
    p = FileHostProvider(small)
    vm = p.vm("a")
    cp = asyncio.run(p.create_checkpoint("a"))
    vm.write("disk0", 0, b"\x55" * 4096)
    overlay_map = small / "a" / ".vmrepl" / "overlay" / "disk0.map"
    overlay_map.write_bytes(b"garbage\n" + overlay_map.read_bytes())
    with pytest.raises(FailedPrecondition, match="line 1 is damaged"):
        asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))
    overlay_map.write_bytes(b"[0, 99999999999]\n")
    with pytest.raises(FailedPrecondition, match="outside disk disk0"):
        asyncio.run(p.remove_checkpoint("a", cp.checkpoint_id))


def test_a_folder_planted_where_a_state_file_goes_fails_the_vm_clearly(small: Path) -> None:
    p = FileHostProvider(small)
    (small / "a" / ".vmrepl" / "checkpoint.json").mkdir(parents=True)
    with pytest.raises(FailedPrecondition, match=r"checkpoint\.json is not a regular file"):
        asyncio.run(p.list_checkpoints("a"))
    (small / "a" / ".vmrepl" / "checkpoint.json").rmdir()
    (small / "a" / ".vmrepl" / "checkpoint.json.tmp").mkdir()  # where the record is written first
    with pytest.raises(DiskError, match=r"checkpoint\.json\.tmp"):
        asyncio.run(p.create_checkpoint("a"))
    assert asyncio.run(p.create_checkpoint("b")).vm_id == load_manifest(small / "b").id
