"""VHDX and VHD readers against images made by qemu-img, every read compared with the raw source."""

from __future__ import annotations

import random
import re
import struct
import subprocess
from pathlib import Path

import crc32c
import pytest

from controller import lab
from tests.conftest import need_tool
from vmrepl.disk import open_reader
from vmrepl.domain import DiskFormat
from vmrepl.errors import UnsupportedDisk
from vmrepl.extent import MiB

GiB = 1024 * MiB
CASES = [
    ("vhdx", "subformat=dynamic,block_size=1M"),
    ("vhdx", "subformat=dynamic,block_size=8M"),
    ("vhdx", "subformat=dynamic,block_size=32M"),
    ("vhdx", "subformat=fixed,block_size=8M"),
    ("vpc", "subformat=dynamic,force_size=on"),
    ("vpc", "subformat=fixed,force_size=on"),
]


def convert(raw: Path, fmt: str, options: str, out: Path) -> Path:
    need_tool("qemu-img")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", options, str(raw), str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fmt") / "src.raw"
    lab.make_mixed_image(path, 48 * MiB + 3 * 64 * 1024, seed=9, block=64 * 1024)  # not a whole number of MiB
    return path


def reader_fmt(fmt: str) -> DiskFormat:
    return DiskFormat.VHD if fmt == "vpc" else DiskFormat(fmt)


@pytest.mark.parametrize(("fmt", "options"), CASES)
def test_reads_match_the_raw_source(raw_image: Path, tmp_path: Path, fmt: str, options: str) -> None:
    image = convert(raw_image, fmt, options, tmp_path / f"img.{fmt}")
    raw = raw_image.read_bytes()
    with open_reader(reader_fmt(fmt), image) as r:
        assert r.size == len(raw)
        whole = bytearray(r.size)
        r.read_into(memoryview(whole), 0)
        assert whole == raw
        rng = random.Random(1)
        for _ in range(200):  # reads at odd offsets, across block boundaries
            off = rng.randrange(0, len(raw) - 1)
            n = rng.randrange(1, min(3 * MiB, len(raw) - off) + 1)
            buf = bytearray(n)
            r.read_into(memoryview(buf), off)
            assert buf == raw[off : off + n]
        gaps = [0] + [x for e in r.allocated_extents() for x in (e.offset, e.end)] + [len(raw)]
        for lo, hi in zip(gaps[::2], gaps[1::2], strict=True):
            assert raw[lo:hi] == bytes(hi - lo)  # what is not allocated reads as zeros


def test_vhdx_over_4gib_interleaves_sector_bitmaps(tmp_path: Path) -> None:
    raw = tmp_path / "big.raw"
    size = 4 * GiB + 512 * MiB
    places = [0, 4 * GiB - MiB, 4 * GiB, 4 * GiB + 7 * MiB, size - MiB]
    blobs = {off: random.Random(off).randbytes(MiB) for off in places}
    with open(raw, "wb") as f:
        f.truncate(size)
        for off, data in blobs.items():
            f.seek(off)
            f.write(data)
    image = convert(raw, "vhdx", "subformat=dynamic,block_size=1M", tmp_path / "big.vhdx")
    with open_reader(DiskFormat.VHDX, image) as r:
        assert r.size == size
        assert [(e.offset, e.length) for e in r.allocated_extents()] == [
            (0, MiB),
            (4 * GiB - MiB, 2 * MiB),
            (4 * GiB + 7 * MiB, MiB),
            (size - MiB, MiB),
        ]
        for off, data in blobs.items():
            buf = bytearray(MiB)
            r.read_into(memoryview(buf), off)
            assert buf == data
        buf = bytearray(2 * MiB)
        r.read_into(memoryview(buf), 4 * GiB + MiB)
        assert buf == bytes(2 * MiB)


def _rewrite_headers(path: Path, change: object) -> None:
    with open(path, "r+b") as f:
        for off in (64 * 1024, 128 * 1024):
            f.seek(off)
            hdr = bytearray(f.read(4096))
            change(hdr)  # type: ignore[operator]
            hdr[4:8] = b"\0\0\0\0"
            hdr[4:8] = struct.pack("<I", crc32c.crc32c(bytes(hdr)))
            f.seek(off)
            f.write(hdr)


def test_vhdx_with_corrupt_header_crc_is_refused(raw_image: Path, tmp_path: Path) -> None:
    image = convert(raw_image, "vhdx", "subformat=dynamic", tmp_path / "bad.vhdx")
    with open(image, "r+b") as f:
        for off in (64 * 1024 + 100, 128 * 1024 + 100):
            f.seek(off)
            f.write(b"\x55")
    with pytest.raises(UnsupportedDisk, match="CRC-32C"):
        open_reader(DiskFormat.VHDX, image)


def test_vhdx_with_a_log_to_replay_is_refused(raw_image: Path, tmp_path: Path) -> None:
    image = convert(raw_image, "vhdx", "subformat=dynamic", tmp_path / "dirty.vhdx")

    def set_log_guid(hdr: bytearray) -> None:
        hdr[48:64] = bytes(range(1, 17))

    _rewrite_headers(image, set_log_guid)
    with pytest.raises(UnsupportedDisk, match="log has entries to replay"):
        open_reader(DiskFormat.VHDX, image)


def test_differencing_vhdx_is_refused(raw_image: Path, tmp_path: Path) -> None:
    image = convert(raw_image, "vhdx", "subformat=dynamic", tmp_path / "child.vhdx")
    data = bytearray(image.read_bytes()[: 4 * MiB])
    # Set HasParent in the file parameters item (found through the metadata table, as a reader would).
    meta = data.find(b"metadata")
    params_guid = bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b")
    entry = data.find(params_guid, meta)
    item_off = struct.unpack_from("<I", data, entry + 16)[0]
    with open(image, "r+b") as f:
        f.seek(meta + item_off + 4)
        f.write(struct.pack("<I", 2))
    with pytest.raises(UnsupportedDisk, match="differencing"):
        open_reader(DiskFormat.VHDX, image)


def test_vhd_with_bad_footer_checksum_is_refused(raw_image: Path, tmp_path: Path) -> None:
    image = convert(raw_image, "vpc", "subformat=fixed,force_size=on", tmp_path / "bad.vhd")
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.seek(size - 512 + 70)
        f.write(b"\x01\x02")
    with pytest.raises(UnsupportedDisk, match="checksum"):
        open_reader(DiskFormat.VHD, image)


def test_not_a_vhdx_is_refused(raw_image: Path) -> None:
    with pytest.raises(UnsupportedDisk, match="not a VHDX"):
        open_reader(DiskFormat.VHDX, raw_image)


def _create_vhdx(path: Path) -> Path:
    need_tool("qemu-img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", str(path), "64M"], check=True)
    return path


@pytest.mark.parametrize("version", [0, 2])
def test_vhdx_with_a_header_version_other_than_1_is_refused(tmp_path: Path, version: int) -> None:
    # [MS-VHDX] 2.2.2.1: Version MUST be 1. Both header copies patched, CRC-32C fixed: only the version is wrong.
    image = _create_vhdx(tmp_path / "v.vhdx")

    def set_version(hdr: bytearray) -> None:
        struct.pack_into("<H", hdr, 66, version)

    _rewrite_headers(image, set_version)
    with pytest.raises(UnsupportedDisk, match=rf"{re.escape(str(image))}: VHDX header version {version} "):
        open_reader(DiskFormat.VHDX, image)


def test_vhdx_made_by_qemu_img_create_opens(tmp_path: Path) -> None:
    image = _create_vhdx(tmp_path / "new.vhdx")
    with image.open("rb") as f:
        f.seek(64 * 1024 + 66)
        assert struct.unpack("<H", f.read(2))[0] == 1
    reader = open_reader(DiskFormat.VHDX, image)
    try:
        assert reader.size == 64 * MiB
    finally:
        reader.close()
