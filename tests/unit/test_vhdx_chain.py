"""Differencing VHDX (AVHDX) chains: parent location, linkage checks, and reads through full, partial,
zero and absent blocks, against a flat image built in memory and against dissect.hypervisor.

qemu-img cannot create differencing VHDX, so the children are crafted here with the format module's
codecs (headers, region table, metadata with a parent locator, BAT with sector bitmap entries)."""

from __future__ import annotations

import os
import random
import struct
import uuid
from pathlib import Path

import pytest
from dissect.hypervisor.disk.vhdx import VHDX

from vmrepl.disk import create_writer, open_reader, open_writer
from vmrepl.disk.fileio import PositionalFile
from vmrepl.disk.vhdx import VhdxReader
from vmrepl.disk.vhdx_format import (
    HEADER_OFFSETS,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    PAYLOAD_ZERO,
    REGION_OFFSETS,
    SB_BLOCK_PRESENT,
    Header,
    ParentLocator,
    bat_index,
    bitmap_index,
    chunk_ratio,
    entry,
    pack_file_identifier,
    pack_metadata,
    pack_region_table,
    read_layout,
)
from vmrepl.domain import DiskFormat
from vmrepl.errors import UnsupportedDisk
from vmrepl.extent import Extent, MiB

SIZE = 8 * MiB
BS = MiB
SS = 512
BAT_AT, META_AT, BITMAP_AT, PAYLOAD_AT = 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB


def data_write_guid(path: Path) -> uuid.UUID:
    f = PositionalFile(path)
    try:
        return read_layout(f).header.data_write_guid
    finally:
        f.close()


def make_child(
    path: Path,
    *,
    linkage: uuid.UUID,
    relative_path: str | None = None,
    absolute: str | None = None,
    own_guid: uuid.UUID | None = None,
    full: dict[int, bytes] | None = None,
    partial: dict[int, dict[int, bytes]] | None = None,
    zero: set[int] | None = None,
) -> None:
    """A differencing VHDX of SIZE with 1 MiB blocks: `full` blocks, `partial` blocks (sector -> 512
    bytes, the bitmap bit set for each), `zero` blocks (PAYLOAD_ZERO); the rest NOT_PRESENT."""
    entries = {"parent_linkage": "{" + str(linkage) + "}"}
    if relative_path is not None:
        entries["relative_path"] = relative_path
    if absolute is not None:
        entries["absolute_win32_path"] = absolute
    ratio = chunk_ratio(SS, BS)
    bat = bytearray(((SIZE // BS + ratio - 1) // ratio) * (ratio + 1) * 8)
    bitmap = bytearray(MiB)
    payload = bytearray()
    for block, data in sorted((full or {}).items()):
        struct.pack_into(
            "<Q", bat, 8 * bat_index(block, ratio), entry(PAYLOAD_FULLY_PRESENT, PAYLOAD_AT + len(payload))
        )
        payload += data
    for block, sectors in sorted((partial or {}).items()):
        struct.pack_into(
            "<Q", bat, 8 * bat_index(block, ratio), entry(PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_AT + len(payload))
        )
        body = bytearray(os.urandom(BS))  # sectors whose bit is clear hold junk: it must never be read
        for sector, data in sectors.items():
            body[sector * SS : (sector + 1) * SS] = data
            bit = block * (BS // SS) + sector
            bitmap[bit // 8] |= 1 << (bit % 8)
        payload += body
    for block in zero or set():
        struct.pack_into("<Q", bat, 8 * bat_index(block, ratio), entry(PAYLOAD_ZERO, 0))
    struct.pack_into("<Q", bat, 8 * bitmap_index(0, ratio), entry(SB_BLOCK_PRESENT, BITMAP_AT))
    header = Header(1, uuid.uuid4(), own_guid or uuid.uuid4(), uuid.UUID(int=0), 0, 1, MiB, MiB)
    meta = pack_metadata(
        block_size=BS, virtual_size=SIZE, page83=uuid.uuid4(), physical_sector_size=4096, parent=ParentLocator(entries)
    )
    with open(path, "wb") as out:
        for at, raw in [
            (0, pack_file_identifier("test")),
            *[(off, header.pack()) for off in HEADER_OFFSETS],
            *[(off, pack_region_table((BAT_AT, MiB), (META_AT, MiB))) for off in REGION_OFFSETS],
            (BAT_AT, bytes(bat)),
            (META_AT, meta),
            (BITMAP_AT, bytes(bitmap)),
            (PAYLOAD_AT, bytes(payload)),
        ]:
            out.seek(at)
            out.write(raw)
        out.truncate(max(PAYLOAD_AT + len(payload), PAYLOAD_AT))


def blocks(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(BS) for _ in range(n)]


def sectors(rng: random.Random, numbers: list[int]) -> dict[int, bytes]:
    return {s: rng.randbytes(SS) for s in numbers}


def apply_partial(flat: bytearray, block: int, secs: dict[int, bytes]) -> None:
    for s, data in secs.items():
        at = block * BS + s * SS
        flat[at : at + SS] = data


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, bytes]:
    """base.vhdx <- mid.avhdx <- top.avhdx and the flat image `top` must read as."""
    rng = random.Random(12)
    base = tmp_path / "base.vhdx"
    data = blocks(rng, 6)
    with create_writer(DiskFormat.VHDX, base, size=SIZE) as w:
        for i, d in enumerate(data):  # blocks 6 and 7 never written
            w.write(d, i * BS)
        w.flush()
    flat = bytearray(b"".join(data) + bytes(2 * BS))

    mid_full = {1: rng.randbytes(BS), 6: rng.randbytes(BS)}
    mid_partial = {2: sectors(rng, [*range(10), 100, 2047]), 4: sectors(rng, [0, 1, 2, 3])}
    make_child(
        tmp_path / "mid.avhdx",
        linkage=data_write_guid(base),
        relative_path=".\\base.vhdx",
        full=mid_full,
        partial=mid_partial,
        zero={3},
    )
    for b, d in mid_full.items():
        flat[b * BS : (b + 1) * BS] = d
    for b, s in mid_partial.items():
        apply_partial(flat, b, s)
    flat[3 * BS : 4 * BS] = bytes(BS)

    top_full = {7: rng.randbytes(BS)}
    top_partial = {2: sectors(rng, list(range(5, 21))), 0: sectors(rng, [1, 3, 5, 2046]), 3: sectors(rng, [7])}
    make_child(
        tmp_path / "top.avhdx",
        linkage=data_write_guid(tmp_path / "mid.avhdx"),
        relative_path="mid.avhdx",
        full=top_full,
        partial=top_partial,
        zero={5},
    )
    for b, d in top_full.items():
        flat[b * BS : (b + 1) * BS] = d
    for b, s in top_partial.items():
        apply_partial(flat, b, s)
    flat[5 * BS : 6 * BS] = bytes(BS)
    return tmp_path / "top.avhdx", bytes(flat)


def first_difference(a: bytes, b: bytes) -> int | None:
    """Where `a` and `b` first differ (None when equal): pytest's own diff of 8 MiB values takes minutes."""
    if a == b:
        return None
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def read_all(reader: VhdxReader) -> bytes:
    buf = bytearray(reader.size)
    reader.read_into(memoryview(buf), 0)
    return bytes(buf)


def test_three_deep_chain_reads_every_byte_as_the_flat_image_and_as_dissect(chain: tuple[Path, bytes]) -> None:
    top, flat = chain
    with VhdxReader(top) as reader:
        assert isinstance(reader, VhdxReader)
        assert [p.name for p in reader.chain] == ["top.avhdx", "mid.avhdx", "base.vhdx"]
        assert first_difference(read_all(reader), flat) is None
        rng = random.Random(3)
        for _ in range(200):  # unaligned reads across sector, block and layer boundaries
            off = rng.randrange(SIZE - 1)
            n = rng.randrange(1, min(3 * SS + 5000, SIZE - off) + 1)
            buf = bytearray(n)
            reader.read_into(memoryview(buf), off)
            assert first_difference(bytes(buf), flat[off : off + n]) is None, (off, n)
    theirs = VHDX(top)
    theirs.seek(0)
    assert first_difference(theirs.read(SIZE), flat) is None


def test_allocated_extents_are_the_union_down_the_chain(chain: tuple[Path, bytes]) -> None:
    top, _flat = chain
    with open_reader(DiskFormat.VHDX, top) as reader:
        # top: 0, 2, 3 partial, 7 full, 5 zero; mid (where top is absent): 1, 4, 6 (3 was zero there, but
        # top's partial block 3 holds data); base (where both are absent): nothing left.
        assert reader.allocated_extents() == [Extent(0, 5 * BS), Extent(6 * BS, 2 * BS)]


def test_missing_parent_is_refused(chain: tuple[Path, bytes]) -> None:
    top, _flat = chain
    (top.parent / "base.vhdx").unlink()
    with pytest.raises(UnsupportedDisk, match="parent of this differencing VHDX is missing"):
        VhdxReader(top)


def test_linkage_mismatch_is_refused(tmp_path: Path) -> None:
    with create_writer(DiskFormat.VHDX, tmp_path / "base.vhdx", size=SIZE) as w:
        w.write(b"x" * BS, 0)
        w.flush()
    make_child(tmp_path / "child.avhdx", linkage=uuid.uuid4(), relative_path="base.vhdx")
    with pytest.raises(UnsupportedDisk, match="chain is broken"):
        VhdxReader(tmp_path / "child.avhdx")


def test_a_loop_is_refused(tmp_path: Path) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    make_child(tmp_path / "a.avhdx", linkage=b, own_guid=a, relative_path="b.avhdx")
    make_child(tmp_path / "b.avhdx", linkage=a, own_guid=b, relative_path="a.avhdx")
    with pytest.raises(UnsupportedDisk, match="loops back"):
        VhdxReader(tmp_path / "a.avhdx")


def test_a_chain_longer_than_the_bound_is_refused(chain: tuple[Path, bytes]) -> None:
    top, _flat = chain
    with pytest.raises(UnsupportedDisk, match="longer than 2 files"):
        VhdxReader(top, max_chain=2)
    with VhdxReader(top, max_chain=3) as reader:
        assert len(reader.chain) == 3


def test_parent_outside_the_roots_is_refused(tmp_path: Path) -> None:
    outside, inside = tmp_path / "outside", tmp_path / "vms"
    outside.mkdir()
    inside.mkdir()
    with create_writer(DiskFormat.VHDX, outside / "base.vhdx", size=SIZE) as w:
        w.write(b"x" * BS, 0)
        w.flush()
    guid = data_write_guid(outside / "base.vhdx")
    make_child(inside / "up.avhdx", linkage=guid, relative_path="..\\outside\\base.vhdx")
    with pytest.raises(UnsupportedDisk, match="outside the allowed roots"):
        VhdxReader(inside / "up.avhdx")  # default root: the child's own folder
    with VhdxReader(inside / "up.avhdx", roots=[tmp_path]) as reader:  # a wider root allows it
        assert reader.chain[-1] == outside / "base.vhdx"
    (inside / "base.vhdx").symlink_to(outside / "base.vhdx")  # a link in the root pointing out of it
    make_child(inside / "link.avhdx", linkage=guid, relative_path="base.vhdx")
    with pytest.raises(UnsupportedDisk, match="outside the allowed roots"):
        VhdxReader(inside / "link.avhdx")


def test_absolute_win32_path_is_mapped_under_a_root(tmp_path: Path) -> None:
    disks = tmp_path / "store"
    (disks / "vm1").mkdir(parents=True)
    with create_writer(DiskFormat.VHDX, disks / "vm1" / "base.vhdx", size=SIZE) as w:
        w.write(b"y" * BS, BS)
        w.flush()
    make_child(
        tmp_path / "child.avhdx",
        linkage=data_write_guid(disks / "vm1" / "base.vhdx"),
        relative_path="nowhere\\base.vhdx",
        absolute="C:\\ClusterStorage\\Volume1\\vm1\\base.vhdx",
    )
    with VhdxReader(tmp_path / "child.avhdx", roots=[disks, tmp_path]) as reader:
        assert reader.chain[-1] == disks / "vm1" / "base.vhdx"
        buf = bytearray(BS)
        reader.read_into(memoryview(buf), BS)
        assert first_difference(bytes(buf), b"y" * BS) is None


def test_writer_refuses_a_differencing_image(chain: tuple[Path, bytes]) -> None:
    with pytest.raises(UnsupportedDisk, match="differencing"):
        open_writer(DiskFormat.VHDX, chain[0])


def test_a_malformed_parent_locator_is_refused() -> None:
    raw = bytearray(ParentLocator({"parent_linkage": "{" + str(uuid.uuid4()) + "}"}).pack())
    assert ParentLocator.parse(bytes(raw), "x").linkage  # the codec round-trips
    struct.pack_into("<I", raw, 20 + 4, 5000)  # the value's offset points past the item
    with pytest.raises(UnsupportedDisk, match="outside the item"):
        ParentLocator.parse(bytes(raw), "x")
    with pytest.raises(UnsupportedDisk, match="not the VHDX one"):
        ParentLocator.parse(bytes(16) + bytes(raw[16:]), "x")
    with pytest.raises(UnsupportedDisk, match="parent_linkage"):
        _ = ParentLocator({"relative_path": "a.vhdx"}).linkage
