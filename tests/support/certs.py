"""The lab's certificates for tests: one set per test run, and TLS settings for any identity in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import lab
from vmrepl.config import TlsSettings


@pytest.fixture(scope="session")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> lab.LabCerts:
    """A CA with certificates for the controller, proxy, target, operator and reader (see lab.LabCerts)."""
    return lab.LabCerts.create(tmp_path_factory.mktemp("certs"))


def tls_settings(certs: lab.LabCerts | Path, name: str = "controller") -> TlsSettings:
    """The TLS settings a program holding certificate `name` uses (certs: the lab's, or their folder)."""
    d = certs.directory if isinstance(certs, lab.LabCerts) else certs
    return TlsSettings(ca_file=d / "ca.pem", cert_file=d / f"{name}.pem", key_file=d / f"{name}.key")
