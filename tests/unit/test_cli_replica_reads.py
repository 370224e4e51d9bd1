"""`vmrepl restore-points export` and `vmrepl replica verify`: the real commands over a fake API."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from controller.cli import common, replica_reads
from controller.cli.main import app
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

POINT = "d4cd8759a2004031bf1b6f0f09760cd2"
SIZE = 1 << 20


class FakeApi:
    def __init__(self) -> None:
        self.requests: list[object] = []

    def ExportRestorePoint(self, request: api.ExportRestorePointRequest) -> Iterator[common_pb2.DiskChunk]:
        self.requests.append(request)
        yield common_pb2.DiskChunk(disk_size=SIZE, offset=4096, data=b"x" * 4096)
        yield common_pb2.DiskChunk(disk_size=SIZE, done=True)

    def VerifyJobReplica(self, request: api.VerifyJobReplicaRequest) -> Iterator[common_pb2.VerifyProgress]:
        self.requests.append(request)
        n = 7 if request.sample_percent else 64
        yield common_pb2.VerifyProgress(disk_id="disk0", blocks_total=n, blocks_checked=n, done=True, block_size=SIZE)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    api_ = FakeApi()
    monkeypatch.setattr(common.conn, "_stub", api_)
    return api_


def test_export_needs_no_vm_the_point_names_it(fake: FakeApi, tmp_path: Path) -> None:
    """Found as a new user: `--vm` was required although the point id `restore-points list` prints belongs to
    one VM, and the API finds it from the point alone."""
    out = tmp_path / "disk0.raw"
    result = CliRunner().invoke(
        app, ["restore-points", "export", "web", POINT, "--disk", "disk0", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    (request,) = fake.requests
    assert isinstance(request, api.ExportRestorePointRequest)
    assert (request.job, request.restore_point, request.vm, request.disk) == ("jobs/web", POINT, "", "disk0")
    assert out.read_bytes() == bytes(4096) + b"x" * 4096 + bytes(SIZE - 8192)


def test_a_sampled_verification_says_it_checked_a_sample(fake: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found as a new user: `--sample 10` reported `7 of 7 blocks checked`, which reads as the whole disk."""
    console = Console(width=120, record=True, file=io.StringIO())
    monkeypatch.setattr(replica_reads, "out", console)
    result = CliRunner().invoke(app, ["replica", "verify", "web", "--sample", "10"])
    assert result.exit_code == 0, result.output
    shown = " ".join(console.export_text().split())
    assert "disk0: 7 blocks checked (a random 10% sample)" in shown, shown
    result = CliRunner().invoke(app, ["replica", "verify", "web"])
    assert "disk0: 64 of 64 blocks checked" in " ".join(console.export_text().split())
