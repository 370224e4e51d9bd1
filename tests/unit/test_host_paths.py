r"""Disks at Hyper-V host paths: the proxy's `host_paths` mappings (C:\... and \\server\share\... to local
folders), the attacks a locator or a parent locator may carry, and a StartDiskTransfer that reads a checkpoint's
AVHDX chain through two mappings into an in-process target."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from proxy_agent import request as rq
from proxy_agent import stats as st
from proxy_agent.config import ProxySettings
from proxy_agent.servicer import ProxyAgentServicer
from tests.datapath_fakes import FakeTarget
from tests.support.points import Aborted, FakeContext
from tests.unit.test_vhdx_chain import BS, SIZE, data_write_guid, make_child
from vmrepl.disk import create_writer
from vmrepl.disk.vhdx import VhdxReader
from vmrepl.domain import DiskFormat
from vmrepl.errors import FailedPrecondition, PathError, UnsupportedDisk
from vmrepl.host_paths import HostPathMapping, chain_roots, map_host_path
from vmrepl.v1 import common_pb2, proxy_pb2

CSV1 = "C:\\ClusterStorage\\Volume1\\"


def mapping(prefix: str, local: Path | str) -> HostPathMapping:
    return HostPathMapping.model_validate({"host_prefix": prefix, "local": str(local)})


def mapped(locator: str, *mappings: HostPathMapping) -> Path | None:
    out = map_host_path(locator, mappings, field="source.locator")
    return None if out is None else out[0]


# --- the mapping itself (no file system) ---


def test_the_longest_prefix_wins_case_and_separators_aside() -> None:
    volume = mapping(CSV1, "/mnt/csv1")
    vm = mapping("c:/clusterstorage/volume1/web01", "/mnt/web01")
    unc = mapping("\\\\FS01\\vms", "/mnt/fs01")
    assert volume.host_prefix == CSV1 and vm.host_prefix == "c:\\clusterstorage\\volume1\\web01\\"
    assert mapped(CSV1 + "db01\\Virtual Hard Disks\\db01.vhdx", volume, vm, unc) == Path(
        "/mnt/csv1/db01/Virtual Hard Disks/db01.vhdx"
    )
    # The deeper mapping wins whatever the order, in any case and with either separator.
    for loc in ("C:\\ClusterStorage\\Volume1\\WEB01\\web01.vhdx", "c:/CLUSTERSTORAGE/volume1/web01/web01.vhdx"):
        assert mapped(loc, volume, vm, unc) == Path("/mnt/web01/web01.vhdx")
        assert mapped(loc, vm, volume) == Path("/mnt/web01/web01.vhdx")
    # The remainder keeps its own case: the share is read as the host spelled it.
    assert mapped("\\\\fs01\\VMS\\Web01.VHDX", unc) == Path("/mnt/fs01/Web01.VHDX")
    assert mapped("//fs01/vms/a/b.vhdx", unc) == Path("/mnt/fs01/a/b.vhdx")
    assert mapped("\\\\?\\UNC\\fs01\\vms\\b.vhdx", unc) == Path("/mnt/fs01/b.vhdx")
    assert mapped("\\\\?\\C:\\ClusterStorage\\Volume1\\b.vhdx", volume) == Path("/mnt/csv1/b.vhdx")


def test_a_prefix_matches_whole_names_only() -> None:
    volume = mapping("C:\\ClusterStorage\\Volume1", "/mnt/csv1")
    assert mapped("C:\\ClusterStorage\\Volume10\\x.vhdx", volume) is None
    assert mapped("D:\\ClusterStorage\\Volume1\\x.vhdx", volume) is None
    assert mapped("\\\\fs01\\vms\\x.vhdx", volume) is None
    assert mapped("\\\\fs01\\vms2\\x.vhdx", mapping("\\\\fs01\\vms", "/mnt/fs01")) is None
    assert mapped("\\\\fs02\\vms\\x.vhdx", mapping("\\\\fs01\\vms", "/mnt/fs01")) is None


@pytest.mark.parametrize(
    ("locator", "why"),
    [
        (CSV1 + "..\\..\\etc\\passwd", "'..'"),
        (CSV1 + "web01\\..\\..\\..\\etc\\shadow", "'..'"),
        ("C:/ClusterStorage/Volume1/../Volume1/x.vhdx", "'..'"),
        (CSV1 + ".\\x.vhdx", "'.'"),
        (CSV1 + "web01\\\\x.vhdx", "empty"),
        (CSV1, "empty"),
        (CSV1 + "web01\\", "empty"),
        (CSV1 + "web01.vhdx:secret", "alternate data stream"),
        (CSV1 + "web01.vhdx::$DATA", "alternate data stream"),
        (CSV1 + "D:\\x.vhdx", "drive letter"),
        (CSV1 + "NUL", "DOS device"),
        (CSV1 + "web01\\com1.vhdx", "DOS device"),
        (CSV1 + "CONOUT$", "DOS device"),
        (CSV1 + "LPT\u00b9.txt", "DOS device"),
        (CSV1 + "web01.vhdx.", "dot or a space"),
        (CSV1 + "web01.vhdx ", "dot or a space"),
        (CSV1 + "w*.vhdx", "character"),
        (CSV1 + "a\x00b.vhdx", "character"),
        (CSV1 + "x" * 256, "longer than"),
    ],
)
def test_what_follows_the_prefix_is_plain_names_only(locator: str, why: str) -> None:
    with pytest.raises(PathError, match=why) as e:
        mapped(locator, mapping(CSV1, "/mnt/csv1"))
    assert e.value.field == "source.locator"


@pytest.mark.parametrize(
    "prefix",
    [
        "C:\\x\\..\\..\\etc",
        "C:\\ClusterStorage\\.\\Volume1",
        "ClusterStorage\\Volume1",
        "/mnt/csv1",
        "\\\\fs01",
        "\\\\?\\C:\\ClusterStorage",
        "\\\\.\\PhysicalDrive0",
        "C:\\vms\\a:stream",
        "C:\\vms\\AUX",
    ],
)
def test_a_mapping_prefix_is_a_clean_windows_folder(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="host_prefix"):
        mapping(prefix, tmp_path)


def test_settings_need_somewhere_to_read_absolute_folders_and_distinct_prefixes(tmp_path: Path) -> None:
    tls = {"ca_file": tmp_path / "ca", "cert_file": tmp_path / "c", "key_file": tmp_path / "k"}

    def settings(**values: Any) -> ProxySettings:
        return ProxySettings.model_validate({"tls": tls, **values})

    ok = settings(host_paths=[{"host_prefix": "C:/ClusterStorage/Volume1/", "local": "/mnt/csv1/./"}])
    assert ok.source_roots == [] and ok.host_paths[0].local == Path("/mnt/csv1")
    with pytest.raises(ValidationError, match="source_roots, host_paths or both"):
        settings()
    with pytest.raises(ValidationError, match="absolute path"):
        settings(host_paths=[{"host_prefix": CSV1, "local": "mnt/csv1"}])
    with pytest.raises(ValidationError, match="host_prefix twice"):
        settings(
            host_paths=[
                {"host_prefix": CSV1, "local": "/a"},
                {"host_prefix": "c:\\clusterstorage\\VOLUME1", "local": "/b"},
            ]
        )
    with pytest.raises(ValidationError, match="extra"):
        settings(host_paths=[{"host_prefix": CSV1, "local": "/a", "follow": True}])
    assert settings(source_roots=[tmp_path]).host_paths == []  # a POSIX proxy as before


def test_chain_roots_are_the_mapped_folders_narrowed_to_the_source_roots() -> None:
    a, b = mapping(CSV1, "/mnt/csv1"), mapping("\\\\fs01\\vms", "/mnt/fs01")
    assert chain_roots([a, b], []) == [Path("/mnt/csv1"), Path("/mnt/fs01")]
    assert chain_roots([], [Path("/srv")]) == [Path("/srv")]
    assert chain_roots([a, b], [Path("/mnt/csv1/vms"), Path("/mnt")]) == [
        Path("/mnt/csv1/vms"),
        Path("/mnt/csv1"),
        Path("/mnt/fs01"),
    ]
    assert chain_roots([a], [Path("/elsewhere")]) == []


# --- source_path: the mapping on a real file system ---


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The local folder an off-host proxy mounts the host's CSV at, with one disk in it."""
    csv = tmp_path / "csv1"
    (csv / "web01" / "Virtual Hard Disks").mkdir(parents=True)
    (csv / "web01" / "Virtual Hard Disks" / "web01.vhdx").write_bytes(b"disk")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.vhdx").write_bytes(b"secret")
    return csv


def test_a_host_path_is_read_below_its_mapped_folder(share: Path) -> None:
    locator = "C:\\ClusterStorage\\Volume1\\web01\\Virtual Hard Disks\\web01.vhdx"
    path = rq.source_path(locator, [], [mapping(CSV1, share)])
    assert path == share / "web01" / "Virtual Hard Disks" / "web01.vhdx"
    assert rq.source_path(locator, [share / "web01"], [mapping(CSV1, share)]) == path  # inside the source roots too
    with pytest.raises(PathError, match="outside the proxy's source roots"):
        rq.source_path(locator, [share.parent / "outside"], [mapping(CSV1, share)])
    with pytest.raises(FailedPrecondition, match="cannot be read"):
        rq.source_path(CSV1 + "web01\\missing.vhdx", [], [mapping(CSV1, share)])
    with pytest.raises(PathError, match="not a regular file"):
        rq.source_path(CSV1 + "web01", [], [mapping(CSV1, share)])


def test_a_symbolic_link_in_the_mapped_folder_is_refused(share: Path) -> None:
    (share / "web01" / "evil.vhdx").symlink_to(share.parent / "outside" / "secret.vhdx")
    (share / "db01").symlink_to(share.parent / "outside", target_is_directory=True)
    (share / "web01" / "alias.vhdx").symlink_to(share / "web01" / "Virtual Hard Disks" / "web01.vhdx")
    for name in ("web01\\evil.vhdx", "db01\\secret.vhdx", "web01\\alias.vhdx"):  # out, through a folder, and in
        with pytest.raises(PathError, match="symbolic link"):
            rq.source_path(CSV1 + name, [], [mapping(CSV1, share)])


def test_an_unmapped_host_path_names_the_path_and_the_setting(share: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"'\\\\\\\\fs01\\\\vms\\\\web01.vhdx'.*`host_paths`") as e:
        rq.source_path("\\\\fs01\\vms\\web01.vhdx", [share], [mapping(CSV1, share)])
    assert "host_prefix -> local" in str(e.value)
    with pytest.raises(FailedPrecondition, match="host_paths"):
        rq.source_path(CSV1 + "web01\\Virtual Hard Disks\\web01.vhdx", [share], [])


def test_a_posix_locator_is_read_as_before(share: Path) -> None:
    disk = share / "web01" / "Virtual Hard Disks" / "web01.vhdx"
    assert rq.source_path(str(disk), [share], [mapping(CSV1, share)]) == disk
    with pytest.raises(PathError, match="outside the proxy's source roots") as e:
        rq.source_path(str(disk), [], [mapping(CSV1, share)])  # a mapping is no source root
    assert f"{str(disk)!r}" in str(e.value) and "add the folder holding it to this proxy's `source_roots`" in str(
        e.value
    )
    with pytest.raises(PathError, match="absolute"):
        rq.source_path("web01.vhdx", [share])


# --- a checkpoint's AVHDX chain through the mappings, at the proxy ---


class Host:
    r"""A host's CSV (C:\ClusterStorage\Volume1\ at csv1/) and a file share (\\fs01\vms\ at fs01/) as an off-host
    proxy mounts them: web01's base disk on the share, two checkpoints' AVHDX on the CSV."""

    def __init__(self, root: Path) -> None:
        self.csv, self.fs = root / "csv1", root / "fs01"
        self.vm = self.csv / "web01" / "Virtual Hard Disks"
        self.vm.mkdir(parents=True)
        (self.fs / "base").mkdir(parents=True)
        self.mappings = [mapping(CSV1, self.csv), mapping("\\\\fs01\\vms\\", self.fs)]
        rng = random.Random(7)
        self.flat = bytearray(rng.randbytes(5 * BS) + bytes(SIZE - 5 * BS))
        with create_writer(DiskFormat.VHDX, self.fs / "base" / "web01.vhdx", size=SIZE) as w:
            w.write(bytes(self.flat[: 5 * BS]), 0)
            w.flush()
        self.rng = rng

    def checkpoints(self, *, absolute: str = "\\\\FS01\\VMS\\base\\web01.vhdx") -> str:
        """web01_A.avhdx (parent: the base, by an absolute path only) <- web01_B.avhdx (relative); B's host path."""
        first = {1: self.rng.randbytes(BS), 6: self.rng.randbytes(BS)}
        make_child(
            self.vm / "web01_A.avhdx",
            linkage=data_write_guid(self.fs / "base" / "web01.vhdx"),
            relative_path="..\\..\\base\\web01.vhdx",  # where it was before a storage move: not found here
            absolute=absolute,
            full=first,
        )
        second = {2: {0: self.rng.randbytes(512), 2047: self.rng.randbytes(512)}}
        make_child(
            self.vm / "web01_B.avhdx",
            linkage=data_write_guid(self.vm / "web01_A.avhdx"),
            relative_path=".\\web01_A.avhdx",
            partial=second,
            zero={3},
        )
        for b, data in first.items():
            self.flat[b * BS : (b + 1) * BS] = data
        for s, data in second[2].items():
            self.flat[2 * BS + s * 512 : 2 * BS + (s + 1) * 512] = data
        self.flat[3 * BS : 4 * BS] = bytes(BS)
        return "c:\\clusterstorage\\VOLUME1\\web01\\Virtual Hard Disks\\web01_B.avhdx"


def proxy(host: Host, target: FakeTarget, *, source_roots: list[Path] | None = None) -> ProxyAgentServicer:
    tls = {"ca_file": host.csv / "ca", "cert_file": host.csv / "c", "key_file": host.csv / "k"}
    settings = ProxySettings.model_validate(
        {"tls": tls, "host_paths": [m.model_dump() for m in host.mappings], "source_roots": source_roots or []}
    )
    return ProxyAgentServicer(settings, target_link=lambda _endpoint: target)


def start_request(locator: str) -> proxy_pb2.StartDiskTransferRequest:
    return proxy_pb2.StartDiskTransferRequest(
        transfer_id="t1",
        session_id="s1",
        checkpoint_id="cp1",
        disk_id="disk0",
        replica_path="jobs/web01",
        ticket=b"ticket",
        source=proxy_pb2.SourceDisk(locator=locator, format=common_pb2.DISK_FORMAT_VHDX, size=SIZE),
        target=proxy_pb2.TargetEndpoint(address="target:7402"),
        block_size=BS,
    )


async def test_a_checkpoint_chain_at_host_paths_is_read_through_the_mappings(tmp_path: Path) -> None:
    host = Host(tmp_path)
    locator = host.checkpoints()
    target = FakeTarget(bytearray(SIZE), BS)
    servicer = proxy(host, target)
    await servicer.StartDiskTransfer(start_request(locator), FakeContext())
    transfer = servicer.transfers["t1"]
    assert transfer.task is not None
    await transfer.task
    assert transfer.stats.state == st.COMPLETED, transfer.stats.error_message
    # Blocks 0 and 4 are only in the base on the share, 1 and 6 in A, block 2's sectors in B over the base.
    assert target.replica == host.flat


async def refusal(servicer: ProxyAgentServicer, locator: str) -> Aborted:
    with pytest.raises(Aborted) as e:
        await servicer.StartDiskTransfer(start_request(locator), FakeContext())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION, e.value.details
    assert not servicer.transfers
    return e.value


async def test_a_parent_the_mappings_do_not_reach_breaks_the_chain_clearly(tmp_path: Path) -> None:
    host = Host(tmp_path)
    locator = host.checkpoints(absolute="E:\\Moved\\web01.vhdx")
    found = await refusal(proxy(host, FakeTarget(bytearray(SIZE), BS)), locator)
    assert "web01_A.avhdx: the parent of this differencing VHDX is missing" in found.details
    assert "its absolute path 'E:\\\\Moved\\\\web01.vhdx' maps to no file here" in found.details
    # Mapped, but narrowed away by the source roots: the share is not a place the proxy may read.
    locator = host.checkpoints()
    found = await refusal(proxy(host, FakeTarget(bytearray(SIZE), BS), source_roots=[host.csv]), locator)
    assert "fs01/base/web01.vhdx resolves outside the allowed roots" in found.details


async def test_a_hostile_parent_locator_is_refused(tmp_path: Path) -> None:
    host = Host(tmp_path)
    (tmp_path / "etc").mkdir()
    os.link(host.fs / "base" / "web01.vhdx", tmp_path / "etc" / "web01.vhdx")  # the very parent, outside
    locator = host.checkpoints(absolute=CSV1 + "..\\..\\etc\\web01.vhdx")
    found = await refusal(proxy(host, FakeTarget(bytearray(SIZE), BS)), locator)
    assert "the parent's absolute path" in found.details and "'..'" in found.details
    # A parent in a mapped folder that is a symbolic link out of every mapping: refused, never read.
    (host.fs / "base" / "web01.vhdx").unlink()
    (host.fs / "base" / "web01.vhdx").symlink_to(tmp_path / "etc" / "web01.vhdx")
    locator = host.checkpoints()
    found = await refusal(proxy(host, FakeTarget(bytearray(SIZE), BS)), locator)
    assert "resolves outside the allowed roots" in found.details


def test_without_a_resolver_the_reader_keeps_its_suffix_search(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.checkpoints(absolute="\\\\fs01\\vms\\base\\web01.vhdx")
    with pytest.raises(UnsupportedDisk, match="missing"):
        VhdxReader(host.vm / "web01_B.avhdx", roots=[host.csv])
    with VhdxReader(host.vm / "web01_B.avhdx", roots=[host.csv, host.fs]) as reader:  # base/web01.vhdx under fs01
        assert reader.chain == [host.vm / "web01_B.avhdx", host.vm / "web01_A.avhdx", host.fs / "base" / "web01.vhdx"]
