"""The file provider's failover side: VMs on layer disks (vmrepl/disk/layer.py) registered in folders the
target agent made, their power, writes, checkpoints, merges and change tracking; attacks on their files;
acknowledged writes under a simulated power cut."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.powercut import Recorder
from tests.support.mounting import differ
from vmrepl.disk import open_reader
from vmrepl.disk.layer import ExtentStore, create_layer
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound, PathError
from vmrepl.extent import Extent, KiB, MiB
from vmrepl.providers.base import VmDiskSpec, VmSpec
from vmrepl.providers.filehost import FileHostProvider

SIZE = 2 * MiB


def _base(seed: int = 1, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def _mount(root: Path, folder: str = "m1", *, size: int = SIZE, base: bytes | None = None) -> Path:
    """What the target agent's MountPoint leaves: a folder with a base and a layer disk over it."""
    d = root / folder
    d.mkdir(parents=True)
    (d / "disk0.base").write_bytes(_base() if base is None else base)
    create_layer(
        d, "disk0", size=size, base="disk0.base", base_format=DiskFormat.RAW, stores=["disk0.point", "disk0.top"]
    )
    return d


def _spec(folder: str = "m1", *, name: str = "web01", size: int = SIZE, path: str = "disk0.layer") -> VmSpec:
    return VmSpec(
        name=name,
        folder=folder,
        configuration=b"",
        disks=(VmDiskSpec(disk_id="disk0", path=path, format=DiskFormat.LAYER, size=size),),
    )


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "host"
    _mount(r)
    return r


# ---- register, power, unregister --------------------------------------------------------------------


def test_a_registered_vm_is_off_on_its_layer_disks_and_refuses_writes_until_started(root: Path) -> None:
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec()))
    assert info.power is PowerState.OFF and info.name == "web01"
    assert [(d.disk_id, d.format, d.size) for d in info.disks] == [("disk0", DiskFormat.LAYER, SIZE)]
    assert info.disks[0].locator == str(root / "m1" / "disk0.layer")
    vm = p.vm(info.vm_id)
    with pytest.raises(FailedPrecondition, match="VM web01 is off"):
        vm.write("disk0", 0, b"x" * 10)
    run(p.start_vm(info.vm_id))
    run(p.start_vm(info.vm_id))  # idempotent
    assert run(p.get_vm(info.vm_id)).power is PowerState.RUNNING
    vm.write("disk0", 4096, b"w" * 5000)
    assert vm.read_current("disk0", 4000, 5200) == _base()[4000:4096] + b"w" * 5000 + _base()[9096:9200]
    assert (root / "m1" / "disk0.base").read_bytes() == _base()  # the point under it is never written
    assert ExtentStore(root / "m1", "disk0.top", size=SIZE).extents() == [Extent(4096, 5000)]
    run(p.shutdown_vm(info.vm_id, wait_seconds=30))
    assert run(p.get_vm(info.vm_id)).power is PowerState.OFF
    run(p.stop_vm(info.vm_id))  # idempotent
    with pytest.raises(FailedPrecondition, match="is off"):
        vm.write("disk0", 0, b"x")


def test_register_is_idempotent_by_folder(root: Path) -> None:
    p = FileHostProvider(root)
    first = run(p.register_vm(_spec()))
    run(p.start_vm(first.vm_id))
    again = run(p.register_vm(_spec(name="other")))
    assert again.vm_id == first.vm_id and again.name == "web01" and again.power is PowerState.RUNNING
    assert len(run(p.list_vms())) == 1


def test_unregister_leaves_the_disks_and_merges_writes_made_under_a_checkpoint(root: Path) -> None:
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec()))
    run(p.start_vm(info.vm_id))
    vm = p.vm(info.vm_id)
    run(p.create_checkpoint(info.vm_id))
    vm.write("disk0", 0, b"c" * 100)
    with pytest.raises(FailedPrecondition, match="running: stop it"):
        run(p.unregister_vm(info.vm_id))
    run(p.stop_vm(info.vm_id))
    run(p.unregister_vm(info.vm_id))
    run(p.unregister_vm(info.vm_id))  # gone already: idempotent
    assert sorted(x.name for x in (root / "m1").iterdir()) == [
        "disk0.base",
        "disk0.layer",
        "disk0.point.map",
        "disk0.point.raw",
        "disk0.top.map",
        "disk0.top.raw",
    ]
    with pytest.raises(NotFound):
        run(p.get_vm(info.vm_id))
    again = run(p.register_vm(_spec()))
    assert again.vm_id != info.vm_id
    assert p.vm(again.vm_id).read_current("disk0", 0, 100) == b"c" * 100


def test_a_register_after_an_unregister_cut_halfway_starts_clean(root: Path) -> None:
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec()))
    run(p.start_vm(info.vm_id))
    run(p.create_checkpoint(info.vm_id))
    run(p.stop_vm(info.vm_id))
    (root / "m1" / "vm.toml").unlink()  # the crash came after vm.toml went, before the state did
    again = run(p.register_vm(_spec()))
    assert again.power is PowerState.OFF
    assert run(p.list_checkpoints(again.vm_id)) == []  # the old VM's record (and its seal) is gone


@pytest.mark.parametrize(
    ("folder", "error", "match"),
    [
        ("../outside", PathError, "not a plain name"),
        ("a/b", PathError, "not a plain name"),
        (".vmrepl-host", PathError, "not a plain name"),
        ("missing", FailedPrecondition, r"missing does not exist: the target agent makes .* in its vm_root"),
    ],
)
def test_register_refuses_a_folder_it_should_not_use(root: Path, folder: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        run(FileHostProvider(root).register_vm(_spec(folder)))


def test_register_refuses_a_linked_folder_and_bad_disks(root: Path, tmp_path: Path) -> None:
    p = FileHostProvider(root)
    (root / "linked").symlink_to(root / "m1", target_is_directory=True)
    with pytest.raises(FailedPrecondition, match="linked is a symbolic link"):
        run(p.register_vm(_spec("linked")))
    with pytest.raises(FailedPrecondition, match=f"is {SIZE} bytes, not the 4096 of its spec"):
        run(p.register_vm(_spec(size=4096)))
    with pytest.raises(InvalidArgument, match=r"'\.\.' component"):
        run(p.register_vm(_spec(path="../m1/disk0.layer")))
    twice = VmDiskSpec(disk_id="disk1", path="disk0.layer", format=DiskFormat.LAYER, size=SIZE)
    with pytest.raises(InvalidArgument, match=r"path disk0\.layer is used by more than one disk"):
        run(p.register_vm(replace(_spec(), disks=(*_spec().disks, twice))))
    with pytest.raises(InvalidArgument, match="id disk0 is used by more than one disk"):
        run(p.register_vm(replace(_spec(), disks=(*_spec().disks, replace(twice, disk_id="disk0", path="x")))))
    with pytest.raises(InvalidArgument, match="at least 1"):
        run(p.register_vm(VmSpec(name="x", folder="m1", configuration=b"", disks=())))
    assert not (root / "m1" / "vm.toml").exists() and not (root / "m1" / ".vmrepl").exists()


def test_a_damaged_or_linked_power_file_is_refused(root: Path, tmp_path: Path) -> None:
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec()))
    power = root / "m1" / ".vmrepl" / "power"
    power.write_text("sleeping\n")
    with pytest.raises(FailedPrecondition, match="says 'sleeping', neither running nor off"):
        run(p.get_vm(info.vm_id))
    with pytest.raises(FailedPrecondition, match="neither running nor off"):
        p.vm(info.vm_id).write("disk0", 0, b"x")
    power.unlink()
    (tmp_path / "elsewhere").write_text("running\n")
    power.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FailedPrecondition, match="power is a symbolic link"):
        run(p.get_vm(info.vm_id))


def test_a_folder_without_a_power_file_runs_as_before(tmp_path: Path) -> None:
    from controller import lab

    lab.create_raw_vm(tmp_path / "h", "a", size=MiB)
    p = FileHostProvider(tmp_path / "h")
    assert run(p.get_vm("a")).power is PowerState.RUNNING
    p.vm("a").write("disk0", 0, b"ok")


# ---- checkpoints, merges and change tracking on layer disks -----------------------------------------


def test_a_checkpoint_freezes_a_layer_disk_and_its_removal_merges_into_the_top_store(root: Path) -> None:
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec()))
    run(p.start_vm(info.vm_id))
    vm = p.vm(info.vm_id)
    vm.write("disk0", 0, b"1" * 4096)
    first = run(p.create_checkpoint(info.vm_id))
    run(p.remove_checkpoint(info.vm_id, first.checkpoint_id))
    cp = run(p.create_checkpoint(info.vm_id))
    vm.write("disk0", 8192, b"2" * 4096)
    vm.write("disk0", 2048, b"3" * 4096)
    (disk,) = cp.disks
    assert disk.format is DiskFormat.LAYER and disk.size == SIZE
    with open_reader(disk.format, Path(disk.locator)) as r:  # as the proxy reads the checkpoint
        frozen = bytearray(3 * 4096)
        r.read_into(memoryview(frozen), 0)
    assert frozen == b"1" * 4096 + _base()[4096 : 3 * 4096]
    now = vm.read_current("disk0", 0, 3 * 4096)
    assert now == b"1" * 2048 + b"3" * 4096 + _base()[6144:8192] + b"2" * 4096
    changes = run(p.changed_ranges(cp, "disk0", first.reference))
    assert changes == []
    run(p.remove_checkpoint(info.vm_id, cp.checkpoint_id))
    assert vm.read_current("disk0", 0, 3 * 4096) == now
    with open_reader(DiskFormat.LAYER, root / "m1" / "disk0.layer") as r:
        merged = bytearray(3 * 4096)
        r.read_into(memoryview(merged), 0)
    assert merged == now and (root / "m1" / "disk0.base").read_bytes() == _base()
    later = run(p.create_checkpoint(info.vm_id))
    assert run(p.changed_ranges(later, "disk0", cp.reference)) == [Extent(2048, 4096), Extent(8192, 4096)]


# ---- attacks on a layer VM's files ------------------------------------------------------------------


def _registered(root: Path) -> tuple[FileHostProvider, str]:
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec()))
    run(p.start_vm(info.vm_id))
    return p, info.vm_id


def _descriptor(root: Path, **changes: object) -> None:
    path = root / "m1" / "disk0.layer"
    doc = json.loads(path.read_bytes())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("attack", "match"),
    [
        (lambda r: _descriptor(r, base="../../secret"), "'../../secret' is not a plain file name"),
        (lambda r: _descriptor(r, stores=["disk0.point", "../top"]), "not a plain file name"),
        (lambda r: (r / "m1" / "disk0.layer").write_bytes(b"[layer]\nbase = 1\n"), "not JSON"),
        (lambda r: (r / "m1" / "disk0.top.map").write_bytes(b"[2097150, 10]\n"), "line 1 lies outside disk"),
        (lambda r: os.truncate(r / "m1" / "disk0.base", SIZE - 4096), "shorter than the layer's"),
        (lambda r: (r / "m1" / "disk0.point.map").unlink(), r"disk0\.point\.map does not exist"),
    ],
)
def test_a_layer_vm_with_damaged_files_fails_clearly_naming_its_folder(
    root: Path, attack: Callable[[Path], object], match: str
) -> None:
    p, vm_id = _registered(root)
    attack(root)
    with pytest.raises(FailedPrecondition, match=match) as e:
        run(p.get_vm(vm_id))
    assert "/dev/fd" not in str(e.value) and str(root / "m1") in str(e.value)
    with pytest.raises(FailedPrecondition, match=match):
        p.vm(vm_id).write("disk0", 0, b"x")
    with pytest.raises(FailedPrecondition, match=match):
        p.vm(vm_id).read_current("disk0", 0, 10)


def test_linked_layer_files_are_refused_and_never_written(root: Path, tmp_path: Path) -> None:
    p, vm_id = _registered(root)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * SIZE)
    for name in ("disk0.base", "disk0.top.raw", "disk0.top.map", "disk0.layer"):
        f = root / "m1" / name
        saved = f.read_bytes()
        f.unlink()
        f.symlink_to(secret)
        with pytest.raises(FailedPrecondition, match="symbolic link"):
            p.vm(vm_id).write("disk0", 0, b"x" * 4096)
        f.unlink()
        f.write_bytes(saved)
    assert secret.read_bytes() == b"s" * SIZE


def test_a_layer_in_a_linked_subfolder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "host"
    _mount(root / "m2", "disks")
    p = FileHostProvider(root)
    vm_id = run(p.register_vm(_spec("m2", path="disks/disk0.layer"))).vm_id
    run(p.start_vm(vm_id))
    p.vm(vm_id).write("disk0", 0, b"ok")
    os.rename(root / "m2" / "disks", tmp_path / "real")
    (root / "m2" / "disks").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(FailedPrecondition, match=r"disks is a symbolic link"):
        p.vm(vm_id).write("disk0", 0, b"x")
    with pytest.raises(FailedPrecondition, match=r"disks is a symbolic link"):
        run(p.get_vm(vm_id))


# ---- power cuts ----------------------------------------------------------------------------------------

WRITES = [(0, b"\x11" * 5000), (MiB + 17, b"\x22" * 70000), (3 * 4096, b"\x33" * 4096), (100, b"\x44" * 300)]


def _view(acked: int) -> bytes:
    data = bytearray(_base())
    for offset, chunk in WRITES[:acked]:
        data[offset : offset + len(chunk)] = chunk
    return bytes(data)


def _program(root: Path, vm_id: str, stop_at: int, *, checkpoint: bool) -> tuple[int, int]:
    """WRITES to the layer disk (under a checkpoint then removed, or straight), with a power cut before
    sync `stop_at` (0: none). Returns the writes acknowledged and the syncs made."""
    p = FileHostProvider(root)
    vm = p.vm(vm_id)
    cp = run(p.create_checkpoint(vm_id)) if checkpoint else None
    acked = 0
    with Recorder(root, stop_at=stop_at) as rec:
        for offset, chunk in WRITES:
            vm.write("disk0", offset, chunk)
            acked += 1
        if cp is not None:
            run(p.remove_checkpoint(vm_id, cp.checkpoint_id))
    if stop_at:
        rec.cut()
    return acked, rec.syncs


@pytest.mark.parametrize("checkpoint", [False, True])
def test_acknowledged_writes_to_a_layer_disk_survive_a_power_cut_at_every_sync(
    tmp_path: Path, checkpoint: bool
) -> None:
    template = tmp_path / "template"
    _mount(template)
    vm_id = run(FileHostProvider(template).register_vm(_spec())).vm_id
    run(FileHostProvider(template).start_vm(vm_id))
    work = tmp_path / "run"
    shutil.copytree(template, work)
    _, total = _program(work, vm_id, 0, checkpoint=checkpoint)
    assert FileHostProvider(work).vm(vm_id).read_current("disk0", 0, SIZE) == _view(len(WRITES))
    for n in range(1, total + 1):
        shutil.rmtree(work)
        shutil.copytree(template, work)
        acked, _ = _program(work, vm_id, n, checkpoint=checkpoint)
        p = FileHostProvider(work)  # after the restart
        seen = p.vm(vm_id).read_current("disk0", 0, SIZE)
        ok = seen == _view(acked) or (acked < len(WRITES) and seen == _view(acked + 1))
        assert ok, f"cut at sync {n}: an acknowledged write was lost ({acked} acknowledged)"
        for cp in run(p.list_checkpoints(vm_id)):
            run(p.remove_checkpoint(vm_id, cp.checkpoint_id))
        run(p.create_checkpoint(vm_id))  # finishes a merge the cut interrupted
        assert p.vm(vm_id).read_current("disk0", 0, SIZE) == seen, f"cut at sync {n}: the merge changed the disk"
        assert (work / "m1" / "disk0.base").read_bytes() == _base(), f"cut at sync {n}: the point was written"


def test_a_shorter_base_reads_through_the_point_store(tmp_path: Path) -> None:
    root = tmp_path / "host"
    d = _mount(root, base=_base()[: SIZE - 64 * KiB])
    ExtentStore(d, "disk0.point", size=SIZE).write(SIZE - 64 * KiB, b"p" * 64 * KiB)
    p = FileHostProvider(root)
    vm_id = run(p.register_vm(_spec())).vm_id
    assert p.vm(vm_id).read_current("disk0", SIZE - 64 * KiB - 4, 8) == _base()[-64 * KiB - 4 : -64 * KiB] + b"pppp"


def test_any_vm_name_is_written_as_toml_that_reads_back(root: Path) -> None:
    name = 'web 😀 "quoted" back\\slash\ttab\nnewline\x7fdel é'
    p = FileHostProvider(root)
    info = run(p.register_vm(_spec(name=name)))
    assert info.name == name and run(p.get_vm(info.vm_id)).name == name
    assert FileHostProvider(root).problems() == {}


def test_registers_of_one_folder_at_once_make_one_vm(root: Path) -> None:
    p = FileHostProvider(root)

    async def both() -> list[str]:
        infos = await asyncio.gather(*(p.register_vm(_spec()) for _ in range(8)))
        return [i.vm_id for i in infos]

    ids = run(both())
    assert len(set(ids)) == 1 and [v.vm_id for v in run(p.list_vms())] == ids[:1]


def test_a_disk_image_with_another_hard_link_is_never_written(tmp_path: Path) -> None:
    # A failed-over VM's base is a hard link of the replica's data file. Whoever may write the VM folder
    # edits vm.toml to name the base itself as a raw disk: the provider would write the replica (its newest
    # point) for the guest. An image with another link may be another file's too: refused, never written.
    root = tmp_path / "host"
    folder = _mount(root)
    replica = tmp_path / "replica-data.raw"
    os.link(folder / "disk0.base", replica)
    p, vm_id = _registered(root)
    manifest = folder / "vm.toml"
    text = manifest.read_text()
    manifest.write_text(text.replace('"disk0.layer"', '"disk0.base"').replace('"layer"', '"raw"'))
    vm = p.vm(vm_id)
    with pytest.raises(FailedPrecondition, match="other hard links"):
        vm.write("disk0", 0, b"x" * 4096)
    cp = run(p.create_checkpoint(vm_id))
    vm.write("disk0", 0, b"y" * 4096)  # into the overlay: the image is not written
    with pytest.raises(FailedPrecondition, match="other hard links"):
        run(p.remove_checkpoint(vm_id, cp.checkpoint_id))
    assert replica.read_bytes() == _base()
    os.unlink(replica)  # once it stands alone (a permanent failover's DeleteReplica), the VM's own disk
    run(p.remove_checkpoint(vm_id, cp.checkpoint_id))
    vm.write("disk0", 4096, b"z" * 4096)
    assert (folder / "disk0.base").read_bytes()[:8192] == b"y" * 4096 + b"z" * 4096


def test_register_does_not_take_a_planted_manifest_for_the_vm(root: Path) -> None:
    # A vm.toml found in the folder is taken as an earlier register's: one naming other disks (an image of
    # someone's own beside the layer) would have the failed-over VM boot it.
    (root / "m1" / "evil.raw").write_bytes(b"\xee" * SIZE)
    (root / "m1" / "vm.toml").write_text(
        'name = "web01"\nid = "6f1c8d5e-3a8b-4e57-9a51-4bd2d1b1e0aa"\n\n'
        '[[disks]]\nid = "disk0"\npath = "evil.raw"\nformat = "raw"\n'
    )
    p = FileHostProvider(root)
    with pytest.raises(FailedPrecondition, match="other disks"):
        run(p.register_vm(_spec()))


# ---- permanent failover: the VM on its plain image ----------------------------------------------------


def test_after_a_flatten_merge_vm_disks_puts_the_vm_on_its_plain_image_and_drops_the_descriptor(root: Path) -> None:
    from vmrepl.disk.layer import flatten_layer
    from vmrepl.providers.filevms import load_manifest

    p, vm_id = _registered(root)
    run(p.start_vm(vm_id))
    p.vm(vm_id).write("disk0", 4096, b"w" * 8192)
    run(p.stop_vm(vm_id))
    with pytest.raises(FailedPrecondition, match="not flattened"):  # the target merges first
        run(p.merge_vm_disks(vm_id))
    assert load_manifest(root / "m1").disks[0].path == "disk0.layer"  # refused: nothing changed
    flatten_layer(root / "m1" / "disk0.layer")
    (root / "m1" / "other.layer").write_text("not a descriptor")  # someone else's: left as it is
    run(p.merge_vm_disks(vm_id))
    (disk,) = load_manifest(root / "m1").disks
    assert (disk.id, disk.path, disk.format) == ("disk0", "disk0.base", DiskFormat.RAW)
    assert sorted(x.name for x in (root / "m1").iterdir() if not x.name.startswith(".")) == [
        "disk0.base",
        "other.layer",
        "vm.toml",
    ]
    want = bytearray(_base())
    want[4096 : 4096 + 8192] = b"w" * 8192
    info = run(p.get_vm(vm_id))
    assert info.vm_id == vm_id and [(d.format, d.size) for d in info.disks] == [(DiskFormat.RAW, SIZE)]
    assert p.vm(vm_id).read_current("disk0", 0, SIZE) == bytes(want)
    run(p.merge_vm_disks(vm_id))  # idempotent
    assert load_manifest(root / "m1").disks == [disk]
    run(p.start_vm(vm_id))
    p.vm(vm_id).write("disk0", 0, b"z" * 512)  # the plain image, one link: written as any raw disk
    assert (root / "m1" / "disk0.base").read_bytes()[:512] == b"z" * 512


def test_a_crash_between_the_manifest_and_the_descriptor_is_finished_by_the_next_merge(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmrepl.disk.layer import flatten_layer
    from vmrepl.providers import filehost

    p, vm_id = _registered(root)
    run(p.stop_vm(vm_id))
    flatten_layer(root / "m1" / "disk0.layer")

    def crash(*_args: object) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(filehost.FileVm, "_drop_flattened_descriptors", crash)
        with pytest.raises(Exception, match="power cut"):
            run(p.merge_vm_disks(vm_id))
    assert (root / "m1" / "disk0.layer").exists()  # left behind, the VM already on its base
    assert run(p.get_vm(vm_id)).disks[0].format is DiskFormat.RAW
    run(p.merge_vm_disks(vm_id))
    assert not (root / "m1" / "disk0.layer").exists()


def test_merge_vm_disks_refuses_a_vm_with_a_checkpoint(root: Path) -> None:
    from vmrepl.disk.layer import flatten_layer

    p, vm_id = _registered(root)
    run(p.create_checkpoint(vm_id))
    run(p.stop_vm(vm_id))
    flatten_layer(root / "m1" / "disk0.layer")
    with pytest.raises(FailedPrecondition, match="has a checkpoint"):
        run(p.merge_vm_disks(vm_id))


def test_merge_vm_disks_cut_by_a_power_cut_at_every_sync_reads_the_same_and_finishes(tmp_path: Path) -> None:
    from vmrepl.disk.layer import flatten_layer
    from vmrepl.providers.filevms import load_manifest

    template = tmp_path / "template"
    _mount(template)
    p = FileHostProvider(template)
    vm_id = run(p.register_vm(_spec())).vm_id
    run(p.start_vm(vm_id))
    p.vm(vm_id).write("disk0", 8192, b"q" * 4096)
    run(p.stop_vm(vm_id))
    flatten_layer(template / "m1" / "disk0.layer")
    want = p.vm(vm_id).read_current("disk0", 0, SIZE)
    work, n = tmp_path / "run", 0
    while True:
        n += 1
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        with Recorder(work, stop_at=n) as rec:
            run(FileHostProvider(work).merge_vm_disks(vm_id))
        if rec.syncs < n:
            break  # ran to the end without reaching sync n: every cut point was tried
        rec.cut()
        after = FileHostProvider(work)  # after the restart: the VM as it was or on its base, same bytes
        assert not differ(after.vm(vm_id).read_current("disk0", 0, SIZE), want), f"cut at sync {n}"
        run(after.merge_vm_disks(vm_id))
        (disk,) = load_manifest(work / "m1").disks
        assert (disk.path, disk.format) == ("disk0.base", DiskFormat.RAW), f"cut at sync {n}"
        assert not list((work / "m1").glob("*.layer")), f"cut at sync {n}"
        assert not differ(after.vm(vm_id).read_current("disk0", 0, SIZE), want), f"cut at sync {n}"
    assert n > 2
