"""vmrepl/disk/layer.py: the extent store, the layer disk, create, open and flatten; their attacks, and their
durability under a simulated power cut (vmrepl.disk.powercut) at every point."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from vmrepl.disk import create_writer, open_reader, open_writer, powercut
from vmrepl.disk.layer import ExtentStore, create_layer, flatten_layer, open_layer, read_descriptor
from vmrepl.domain import DiskFormat
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, UnsupportedDisk, VmreplError
from vmrepl.extent import Extent, KiB, merge, subtract

SIZE = 256 * KiB


def _pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _layer(folder: Path, *, base: bytes | None = None, size: int = SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "disk0.base").write_bytes(_pattern(size, 1) if base is None else base)
    if base == b"":
        os.truncate(folder / "disk0.base", size)  # sparse: allocated nowhere
    return create_layer(
        folder, "disk0", size=size, base="disk0.base", base_format=DiskFormat.RAW, stores=["disk0.point", "disk0.top"]
    )


def _read(path: Path) -> bytes:
    with open_layer(path) as disk:
        buf = bytearray(disk.size)
        disk.read_into(memoryview(buf), 0)
    return bytes(buf)


# ---- the extent store ---------------------------------------------------------------------------------


def test_a_store_holds_what_was_written_and_reads_only_that(tmp_path: Path) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    assert s.extents() == []
    s.write(4096, b"a" * 100)
    s.write(4196, b"b" * 50)
    s.write(0, b"c" * 10)
    assert s.extents() == [Extent(0, 10), Extent(4096, 150)]
    buf = bytearray(b"-" * 8192)
    s.read_into(memoryview(buf), 0)
    assert buf[:10] == b"c" * 10 and buf[10:4096] == b"-" * 4086
    assert buf[4096:4246] == b"a" * 100 + b"b" * 50 and buf[4246:] == b"-" * (8192 - 4246)
    s.write(4100, b"z" * 4)  # over what it held: replaced
    buf2 = bytearray(8)
    s.read_into(memoryview(buf2), 4096)
    assert bytes(buf2) == b"aaaazzzz"
    other = ExtentStore(tmp_path, "d", size=SIZE)  # another instance sees every write
    assert other.extents() == s.extents()


def test_a_map_replaced_by_another_file_is_read_again_whole(tmp_path: Path) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    s.write(0, b"a" * 10)
    assert s.extents() == [Extent(0, 10)]
    other = tmp_path / "other.map"
    other.write_bytes(b"[100, 5]\n[200, 5]\n")
    os.replace(other, s.map_path)
    assert s.extents() == [Extent(100, 5), Extent(200, 5)]


def test_write_missing_keeps_the_first_writer_s_bytes(tmp_path: Path) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    assert s.write_missing(1000, b"1" * 1000) == 1000
    assert s.write_missing(500, b"2" * 2000) == 1000  # [500, 1000) and [2000, 2500)
    assert s.write_missing(1200, b"3" * 100) == 0
    buf = bytearray(2500)
    s.read_into(memoryview(buf), 0)
    assert buf[500:1000] == b"2" * 500 and buf[1000:2000] == b"1" * 1000 and buf[2000:2500] == b"2" * 500
    assert s.extents() == [Extent(500, 2000)]


def test_writes_outside_the_disk_are_refused_and_change_nothing(tmp_path: Path) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    for offset, n in ((-1, 10), (SIZE - 5, 10)):
        with pytest.raises(InvalidArgument, match="outside disk d"):
            s.write(offset, b"x" * n)
        with pytest.raises(InvalidArgument):
            s.write_missing(offset, b"x" * n)
    assert s.extents() == [] and not s.exists()


def test_a_torn_map_line_is_left_out_and_cut_before_the_next_append(tmp_path: Path) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    s.write(0, b"a" * 10)
    with open(s.map_path, "ab") as m:
        m.write(b"[8192, 40")  # a crash in the middle of an append
    assert ExtentStore(tmp_path, "d", size=SIZE).extents() == [Extent(0, 10)]
    s.write(100, b"b")
    assert s.map_path.read_bytes() == b"[0, 10]\n[100, 1]\n"


def test_map_lines_never_cross_a_sector_and_a_lost_filler_is_harmless(tmp_path: Path) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    for i in range(80):
        s.write(i * 3001, b"q" * (i + 1))
    data = s.map_path.read_bytes()
    pos, fillers = 0, []
    for line in data.splitlines(keepends=True):
        assert pos // 512 == (pos + len(line) - 1) // 512, f"line at {pos} crosses a sector"
        if not line.strip():
            fillers.append((pos, len(line)))
        pos += len(line)
    assert fillers, "80 lines of 10 to 20 bytes need a filler somewhere"
    for at, n in fillers:  # the filler's sector part lost (zeros, no newline): the next line still reads
        lost = data[:at] + b"\x00" * n + data[at + n :]
        s.map_path.write_bytes(lost)
        assert ExtentStore(tmp_path, "d", size=SIZE).extents() == s.extents()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"garbage", "line 2 is damaged"),
        (b"[1, 2, 3]", "line 2 is damaged"),
        (b"[true, 5]", "line 2 is damaged"),
        (b'{"o": 1}', "line 2 is damaged"),
        (b"[0, 99999999999]", "line 2 lies outside disk d"),
        (b"[-5, 10]", "line 2 lies outside disk d"),
        (b"[5, 0]", "line 2 lies outside disk d"),
    ],
)
def test_a_damaged_or_outside_map_line_is_refused(tmp_path: Path, line: bytes, match: str) -> None:
    s = ExtentStore(tmp_path, "d", size=SIZE)
    s.write(0, b"a")
    with open(s.map_path, "ab") as m:
        m.write(line + b"\n")
    with pytest.raises(FailedPrecondition, match=match):
        ExtentStore(tmp_path, "d", size=SIZE).extents()
    with pytest.raises(FailedPrecondition, match=match):
        s.write(10, b"b")  # nothing is written over a map it cannot read


def test_store_files_planted_as_links_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    folder = tmp_path / "f"
    folder.mkdir()
    s = ExtentStore(folder, "d", size=SIZE)
    s.write(0, b"a" * 4096)
    s.data_path.unlink()
    s.data_path.symlink_to(secret)
    with pytest.raises(FailedPrecondition, match=r"d\.raw is a symbolic link"):
        s.read_into(memoryview(bytearray(4096)), 0)
    with pytest.raises(FailedPrecondition, match=r"d\.raw is a symbolic link"):
        s.write(0, b"b" * 10)
    s.data_path.unlink()
    os.link(secret, s.data_path)
    with pytest.raises(FailedPrecondition, match="other hard links"):
        s.write(0, b"b" * 10)
    assert secret.read_bytes() == b"s" * 4096
    s.map_path.unlink()
    s.map_path.symlink_to(secret)
    with pytest.raises(FailedPrecondition, match=r"d\.map is a symbolic link"):
        ExtentStore(folder, "d").extents()


def test_a_store_name_must_be_plain(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "..", "", "a\x00"):
        with pytest.raises(InvalidArgument):
            ExtentStore(tmp_path, bad)


# ---- power cuts over store writes -----------------------------------------------------------------------

# Disjoint writes, then first-writer-wins writes over them and past them: every byte ever held has one value.
OPS: list[tuple[str, int, int]] = [
    *(("write", i * 5000 + 7, 1000 + i * 37) for i in range(24)),
    *(("missing", i * 5000, 4000) for i in range(0, 24, 3)),
    ("missing", 200 * KiB, 20 * KiB),
]


# Written before the recording, so the recorded map lines cross the map's first page boundary.
PREFILL = [(230 * KiB + 3 * i, 1) for i in range(330)]


def _value(kind: str, i: int, n: int) -> bytes:
    return bytes([(i * 7 + 1) % 251 + (kind == "missing")]) * n


def _store_program(folder: Path, rec: powercut.Recording) -> list[int]:
    """Runs OPS; returns the log position after each returned (acknowledged)."""
    s = ExtentStore(folder, "d", size=SIZE)
    acked = []
    for i, (kind, offset, n) in enumerate(OPS):
        if kind == "write":
            s.write(offset, _value(kind, i, n))
        else:
            s.write_missing(offset, _value(kind, i, n))
        acked.append(rec.position())
    return acked


def _expected_bytes() -> tuple[bytearray, list[list[Extent]]]:
    """The one value each byte can hold, and the ranges each op added."""
    want = bytearray(SIZE)
    held: list[Extent] = [Extent(o, n) for o, n in PREFILL]
    for o, n in PREFILL:
        want[o : o + n] = b"\x01" * n
    added = []

    for i, (kind, offset, n) in enumerate(OPS):
        new = subtract([Extent(offset, n)], held) if kind == "missing" else [Extent(offset, n)]
        for e in new:
            want[e.offset : e.end] = _value(kind, i, e.length)
        held = merge([*held, *new])
        added.append(new)
    return want, added


def test_acknowledged_store_writes_survive_a_power_cut_at_every_point(tmp_path: Path) -> None:
    folder = tmp_path / "root" / "store"
    folder.mkdir(parents=True)
    before = ExtentStore(folder, "d", size=SIZE)
    for o, n in PREFILL:
        before.write(o, b"\x01" * n)
    assert 3500 < before.map_path.stat().st_size < 4096
    with powercut.recording(tmp_path / "root") as rec:
        acked = _store_program(folder, rec)
    log = rec.log()
    want, added = _expected_bytes()
    rng = random.Random(5)
    points = powercut.cut_points(log, rng, n=400)
    # Random subsets, and the worst for a map line crossing a page: its first page lost, its second kept.
    chooser: list[Callable[[powercut.Op], bool] | None] = [None, None, lambda op: op.offset % powercut.PAGE == 0]
    for upto in points:
        for seed, keep in enumerate(chooser):
            dest = tmp_path / f"cut-{upto}-{seed}"
            powercut.crash_state(log, upto, random.Random(seed * 1000 + upto), keep=keep).materialise(dest)
            s = ExtentStore(dest / "store", "d", size=SIZE)
            extents = s.extents()  # never refused: a cut leaves nothing that reads as damage
            buf = bytearray(SIZE)
            s.read_into(memoryview(buf), 0)
            for e in extents:
                assert buf[e.offset : e.end] == want[e.offset : e.end], f"cut {upto}: bytes never written listed"
            for i, pos in enumerate(acked):
                if pos - 1 <= upto:
                    for e in added[i]:
                        assert buf[e.offset : e.end] == want[e.offset : e.end], f"cut {upto}: op {i} lost"
            s.write_missing(0, b"\xee" * 10)  # and writing goes on after it
            shutil.rmtree(dest)


# ---- the layer disk ----------------------------------------------------------------------------------


def test_a_new_layer_reads_as_its_base_and_writes_go_to_the_top_store(tmp_path: Path) -> None:
    path = _layer(tmp_path / "vm")
    base = (tmp_path / "vm" / "disk0.base").read_bytes()
    assert path.name == "disk0.layer" and _read(path) == base
    with open_layer(path, writable=True) as disk:
        disk.write(100, b"w" * 5000)
    point = ExtentStore(tmp_path / "vm", "disk0.point", size=SIZE)
    point.write(0, b"p" * 300)  # the point store is under the top: its bytes show where the top has none
    got = _read(path)
    assert got[:100] == b"p" * 100 and got[100:5100] == b"w" * 5000 and got[5100:] == base[5100:]
    assert (tmp_path / "vm" / "disk0.base").read_bytes() == base  # never written
    with open_layer(path) as disk, pytest.raises(FailedPrecondition, match="read-only"):
        disk.write(0, b"x")
    with open_layer(path) as disk:
        assert disk.allocated_extents() == [Extent(0, SIZE)]


def test_the_factory_reads_and_writes_layers_but_makes_none(tmp_path: Path) -> None:
    path = _layer(tmp_path / "vm", base=b"")
    with open_writer(DiskFormat.LAYER, path) as w:
        w.write(b"v" * 10, 4096)
        w.write_zeros(4096, 2)
        w.flush()
    with open_reader(DiskFormat.LAYER, path) as r:
        assert r.size == SIZE and r.allocated_extents() == [Extent(4096, 10)]
        buf = bytearray(12)
        r.read_into(memoryview(buf), 4095)
        assert bytes(buf) == b"\x00\x00\x00" + b"v" * 8 + b"\x00"
    with pytest.raises(UnsupportedDisk, match="create_layer"):
        create_writer(DiskFormat.LAYER, tmp_path / "new.layer", size=SIZE)


def test_create_again_is_idempotent_and_other_settings_are_refused(tmp_path: Path) -> None:
    path = _layer(tmp_path / "vm")
    with open_layer(path, writable=True) as disk:
        disk.write(0, b"kept")
    again = create_layer(
        tmp_path / "vm",
        "disk0",
        size=SIZE,
        base="disk0.base",
        base_format=DiskFormat.RAW,
        stores=["disk0.point", "disk0.top"],
    )
    assert again == path and _read(path)[:4] == b"kept"
    with pytest.raises(AlreadyExists, match="other settings"):
        create_layer(tmp_path / "vm", "disk0", size=SIZE, base="disk0.base", base_format=DiskFormat.RAW, stores=["t"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": "../disk0.base"}, "plain file name"),
        ({"stores": ["../x"]}, "plain file name"),
        ({"stores": []}, "at least one store"),
        ({"stores": ["a", "a"]}, "twice"),
        ({"stores": ["disk0"]}, "another part of the layer"),  # disk0.raw... no: collides with base below
        ({"base_format": DiskFormat.LAYER}, "cannot be a layer's base"),
        ({"size": -1}, "not a disk size"),
    ],
)
def test_create_refuses_bad_settings(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    (tmp_path / "disk0.raw").write_bytes(bytes(SIZE))
    settings: dict[str, object] = {
        "size": SIZE,
        "base": "disk0.raw",
        "base_format": DiskFormat.RAW,
        "stores": ["top"],
        **kwargs,
    }
    with pytest.raises(InvalidArgument, match=match):
        create_layer(tmp_path, "disk0", **settings)  # type: ignore[arg-type]
    assert not (tmp_path / "disk0.layer").exists()


def test_create_refuses_a_missing_or_linked_base(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        create_layer(tmp_path, "d", size=SIZE, base="nothing", base_format=DiskFormat.RAW, stores=["t"])
    (tmp_path / "real").write_bytes(bytes(SIZE))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        create_layer(tmp_path, "d", size=SIZE, base="link", base_format=DiskFormat.RAW, stores=["t"])


# ---- attacks on a layer's files -----------------------------------------------------------------------


def _rewrite(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_bytes())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not json {", "not a layer descriptor .not JSON."),
        (b"\xff\xfe", "not a layer descriptor .not JSON."),
        (b"[1, 2]", "not a layer descriptor .it needs exactly"),
        (b"{}", "it needs exactly"),
    ],
)
def test_a_descriptor_that_is_not_one_is_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = _layer(tmp_path / "vm")
    path.write_bytes(content)
    with pytest.raises(FailedPrecondition, match=match):
        open_layer(path)
    with pytest.raises(FailedPrecondition, match=match):
        flatten_layer(path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"base": "../../etc/passwd"}, "not a plain file name"),
        ({"base": "/etc/passwd"}, "not a plain file name"),
        ({"stores": ["../elsewhere"]}, "not a plain file name"),
        ({"stores": []}, "non-empty list"),
        ({"stores": "disk0.top"}, "non-empty list"),
        ({"base_format": "layer"}, "base_format 'layer'"),
        ({"size": -5}, "not a disk size"),
        ({"size": True}, "not a disk size"),
        ({"size": 1 << 60}, "not a disk size"),
        ({"size": "5"}, "not a disk size"),
        ({"base": "disk0.layer"}, "another part of the layer"),
        ({"stores": ["disk0.top", "disk0.top"]}, "distinct names"),
        ({"state": "odd"}, "state 'odd'"),
        ({"vmrepl_layer": 2}, "layer version 2"),
    ],
)
def test_a_descriptor_with_bad_fields_is_refused(tmp_path: Path, changes: dict[str, object], match: str) -> None:
    path = _layer(tmp_path / "vm")
    _rewrite(path, **changes)
    with pytest.raises(FailedPrecondition, match=match):
        open_layer(path)


def test_a_linked_descriptor_base_or_store_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * SIZE)
    path = _layer(tmp_path / "vm")
    base = tmp_path / "vm" / "disk0.base"
    saved = base.read_bytes()
    base.unlink()
    base.symlink_to(outside / "secret")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        open_layer(path)
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        flatten_layer(path)
    base.unlink()
    base.write_bytes(saved)
    top = tmp_path / "vm" / "disk0.top.map"
    top.unlink()
    top.symlink_to(outside / "secret")
    with pytest.raises(FailedPrecondition, match=r"disk0\.top\.map is a symbolic link"):
        open_layer(path)
    top.unlink()
    top.write_bytes(b"")
    moved = tmp_path / "moved.layer"
    path.rename(moved)
    path.symlink_to(moved)
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        open_layer(path)
    assert (outside / "secret").read_bytes() == b"s" * SIZE


def test_a_missing_store_is_refused_not_read_as_empty(tmp_path: Path) -> None:
    path = _layer(tmp_path / "vm")
    (tmp_path / "vm" / "disk0.point.map").unlink()
    with pytest.raises(FailedPrecondition, match=r"disk0\.point\.map does not exist"):
        open_layer(path)


def test_a_store_map_with_lines_outside_the_disk_is_refused(tmp_path: Path) -> None:
    path = _layer(tmp_path / "vm")
    (tmp_path / "vm" / "disk0.top.map").write_bytes(f"[{SIZE - 10}, 20]\n".encode())
    with pytest.raises(FailedPrecondition, match=r"lies outside disk disk0\.top"):
        _read(path)
    with pytest.raises(FailedPrecondition, match="lies outside disk"):
        flatten_layer(path)
    assert read_descriptor(path).state == "layered"


def test_a_base_shorter_than_the_layer_needs_the_stores_to_hold_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    path = _layer(folder, base=_pattern(SIZE - 8192, 3))  # the replica shrank after the point
    with pytest.raises(FailedPrecondition, match=r"is 253952 bytes, shorter than the layer's 262144.*from 253952"):
        open_layer(path)
    ExtentStore(folder, "disk0.point", size=SIZE).write(SIZE - 8192, b"p" * 4096)
    with pytest.raises(FailedPrecondition, match="from 258048"):
        open_layer(path)
    ExtentStore(folder, "disk0.point", size=SIZE).write(SIZE - 4096, b"q" * 4096)
    got = _read(path)
    assert got[-8192:] == b"p" * 4096 + b"q" * 4096 and got[:-8192] == _pattern(SIZE - 8192, 3)
    with open_layer(path) as disk:  # the point's size, whatever the base's
        assert disk.size == SIZE


def test_a_base_longer_than_the_layer_is_read_up_to_the_layer_s_size(tmp_path: Path) -> None:
    path = _layer(tmp_path / "vm", base=_pattern(SIZE + 4096, 4), size=SIZE)
    assert _read(path) == _pattern(SIZE + 4096, 4)[:SIZE]
    with open_layer(path) as disk, pytest.raises(InvalidArgument, match="outside layer"):
        disk.read_into(memoryview(bytearray(10)), SIZE - 5)


# ---- flatten -----------------------------------------------------------------------------------------


def _written(folder: Path, path: Path) -> bytes:
    """A layer with bytes in both stores (overlapping), and what it reads as."""
    ExtentStore(folder, "disk0.point", size=SIZE).write(0, b"P" * 20000)
    with open_layer(path, writable=True) as disk:
        disk.write(10000, b"T" * 20000)
        disk.write(SIZE - 100, b"E" * 100)
    return _read(path)


def test_flatten_merges_into_the_base_and_is_idempotent(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    path = _layer(folder)
    view = _written(folder, path)
    base = flatten_layer(path)
    assert base == folder / "disk0.base" and base.read_bytes() == view
    assert read_descriptor(path).state == "flattened"
    assert sorted(p.name for p in folder.iterdir()) == ["disk0.base", "disk0.layer"]
    assert flatten_layer(path) == base and base.read_bytes() == view
    assert _read(path) == view
    with open_layer(path, writable=True) as disk:  # the plain image, through the descriptor
        disk.write(5, b"after")
    assert base.read_bytes()[5:10] == b"after"


def test_flatten_writes_only_the_base_it_was_told_of_checked_on_the_file_it_opens(tmp_path: Path) -> None:
    """A caller checks the base is the replica's data file, then flattens: a base swapped in the folder
    between the two (a VM folder others may write) must not be merged into."""
    folder = tmp_path / "vm"
    path = _layer(folder)
    view = _written(folder, path)
    base = folder / "disk0.base"
    st = os.stat(base)
    other = tmp_path / "other.raw"
    other.write_bytes(b"o" * SIZE)
    os.rename(base, tmp_path / "kept.raw")
    os.link(other, base)  # swapped after the caller's check
    with pytest.raises(FailedPrecondition, match="not the base image"):
        flatten_layer(path, base_identity=(st.st_dev, st.st_ino))
    assert other.read_bytes() == b"o" * SIZE
    os.remove(base)
    os.link(tmp_path / "kept.raw", base)  # the right file back: flattened, through the file opened
    assert flatten_layer(path, base_identity=(st.st_dev, st.st_ino)) == base
    assert (tmp_path / "kept.raw").read_bytes() == view


def test_flatten_grows_a_short_base_from_the_stores(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    path = _layer(folder, base=_pattern(SIZE - 4096, 6))
    ExtentStore(folder, "disk0.point", size=SIZE).write(SIZE - 4096, b"g" * 4096)
    view = _read(path)
    assert flatten_layer(path).read_bytes() == view


def test_flatten_refuses_a_base_it_cannot_write(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "b.vhd").write_bytes(b"x")
    path = folder / "d.layer"
    path.write_text(
        json.dumps(
            {
                "vmrepl_layer": 1,
                "size": 0,
                "base": "b.vhd",
                "base_format": "vhd",
                "stores": ["t"],
                "state": "layered",
            }
        )
    )
    with pytest.raises(VmreplError):
        flatten_layer(path)
    assert read_descriptor(path).state == "layered"


def _flatten_recorded(tmp_path: Path) -> tuple[powercut.OpLog, bytes]:
    root = tmp_path / "root"
    folder = root / "vm"
    path = _layer(folder, base=_pattern(SIZE - 4096, 8))
    ExtentStore(folder, "disk0.point", size=SIZE).write(SIZE - 4096, b"g" * 4096)
    view = _written(folder, path)
    with powercut.recording(root) as rec:
        flatten_layer(path)
    return rec.log(), view


def _check_after_crash(dest: Path, view: bytes, what: str) -> None:
    path = dest / "vm" / "disk0.layer"
    assert _read(path) == view, f"{what}: the layer reads otherwise"
    assert flatten_layer(path).read_bytes() == view, f"{what}: flattening again differs"
    assert sorted(p.name for p in (dest / "vm").iterdir()) == ["disk0.base", "disk0.layer"], what


def test_flatten_killed_at_every_step_is_finished_by_flattening_again(tmp_path: Path) -> None:
    log, view = _flatten_recorded(tmp_path)
    for upto in range(-1, len(log.ops)):
        dest = tmp_path / f"kill-{upto}"
        state = powercut.crash_state(log, upto, random.Random(upto), keep=lambda _op: True)  # kill -9: all kept
        state.materialise(dest)
        _check_after_crash(dest, view, f"killed after op {upto}")
        shutil.rmtree(dest)


def test_flatten_cut_by_power_at_every_step_is_finished_by_flattening_again(tmp_path: Path) -> None:
    log, view = _flatten_recorded(tmp_path)
    for upto in powercut.cut_points(log, random.Random(2), n=300):
        for seed in range(3):
            dest = tmp_path / f"cut-{upto}-{seed}"
            powercut.crash_state(log, upto, random.Random(seed * 7919 + upto)).materialise(dest)
            _check_after_crash(dest, view, f"power cut after op {upto} (seed {seed})")
            shutil.rmtree(dest)


def test_create_cut_by_power_leaves_no_layer_or_a_whole_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = root / "vm"
    folder.mkdir(parents=True)
    base = _pattern(SIZE, 9)
    (folder / "disk0.base").write_bytes(base)
    with powercut.recording(root) as rec:
        create_layer(
            folder, "disk0", size=SIZE, base="disk0.base", base_format=DiskFormat.RAW, stores=["disk0.p", "disk0.t"]
        )
    log = rec.log()
    for upto in range(-1, len(log.ops)):
        for seed in range(4):
            dest = tmp_path / f"cut-{upto}-{seed}"
            powercut.crash_state(log, upto, random.Random(seed + 31 * upto)).materialise(dest)
            path = dest / "vm" / "disk0.layer"
            if path.exists():
                assert _read(path) == base
            else:  # made again from scratch, over whatever the cut left
                create_layer(
                    dest / "vm",
                    "disk0",
                    size=SIZE,
                    base="disk0.base",
                    base_format=DiskFormat.RAW,
                    stores=["disk0.p", "disk0.t"],
                )
                assert _read(path) == base
            shutil.rmtree(dest)


def test_a_flattened_base_still_linked_to_its_replica_is_not_written(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    path = _layer(folder)
    view = _written(folder, path)
    os.link(folder / "disk0.base", tmp_path / "replica-data")  # as the mount made it
    flatten_layer(path)
    with open_layer(path, writable=True) as disk, pytest.raises(FailedPrecondition, match="1 other hard link"):
        disk.write(0, b"x")
    (tmp_path / "replica-data").unlink()  # DeleteReplica
    with open_layer(path, writable=True) as disk:
        disk.write(0, b"x")
    assert _read(path) == b"x" + view[1:]


@pytest.mark.parametrize("name", ["disk0.base", "disk0.top.map", "disk0.top.raw", "disk0.layer"])
def test_a_fifo_or_folder_planted_for_a_layer_file_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    path = _layer(tmp_path / "vm")
    with open_layer(path, writable=True) as disk:
        disk.write(0, b"t" * 10)  # so the top store's data file is read
    f = tmp_path / "vm" / name
    f.unlink()
    os.mkfifo(f)
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        _read(path)
    f.unlink()
    f.mkdir()
    with pytest.raises(FailedPrecondition):
        _read(path)


def test_a_layer_over_a_vhdx_base_reads_and_flattens(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    size = 8 * 1024 * KiB
    content = _pattern(size, 12)
    with create_writer(DiskFormat.VHDX, folder / "disk0.vhdx", size=size, block_size=1024 * KiB) as w:
        w.write(content[: 3 * 1024 * KiB], 0)  # the rest unallocated: zeros
        w.flush()
    path = create_layer(
        folder, "disk0", size=size, base="disk0.vhdx", base_format=DiskFormat.VHDX, stores=["disk0.top"]
    )
    with open_layer(path, writable=True) as disk:
        disk.write(1024 * KiB - 10, b"x" * 20)
        disk.write(6 * 1024 * KiB, b"y" * 4096)
    view = _read(path)
    want = bytearray(content[: 3 * 1024 * KiB] + bytes(size - 3 * 1024 * KiB))
    want[1024 * KiB - 10 : 1024 * KiB + 10] = b"x" * 20
    want[6 * 1024 * KiB : 6 * 1024 * KiB + 4096] = b"y" * 4096
    assert view == want
    base = flatten_layer(path)
    with open_reader(DiskFormat.VHDX, base) as r:
        got = bytearray(size)
        r.read_into(memoryview(got), 0)
    assert got == want and _read(path) == want
