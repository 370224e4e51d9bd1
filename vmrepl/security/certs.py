"""`vmrepl-certs`: a private CA and per-component certificates, for tests and first installs.

Each certificate names its component in the subject CN and its role in the
OU (controller, proxy, target, operator, reader); the agents authorise calls
by that role. The controller also gets an Ed25519 key pair for signing
transfer tickets; targets hold its public key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("controller", "proxy", "target", "operator", "reader")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# What `init` issues: one certificate per component, and an operator.
DEFAULT_COMPONENTS = (
    ("controller", "controller"),
    ("proxy", "proxy"),
    ("target", "target"),
    ("operator", "operator"),
)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def create_ca(directory: Path, *, days: int = 3650) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmrepl CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _pem_key(key), private=True)
    _write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def issue(directory: Path, *, name: str, role: str, hosts: list[str], days: int = 825) -> None:
    """Issue `<name>.pem`/`<name>.key`, signed by the CA in `directory`, for client and server use."""
    if role not in ROLES:
        raise SystemExit(f"role must be one of {', '.join(ROLES)}")
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SystemExit("ca.key is not an EC key made by vmrepl-certs")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmrepl"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / f"{name}.key", _pem_key(key), private=True)
    _write(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def create_signing_key(directory: Path, name: str = "controller-signing") -> None:
    """The controller's Ed25519 ticket-signing key pair."""
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write(directory / f"{name}.key", _pem_key(key), private=True)
    _write(directory / f"{name}.pub", pub, private=False)


def init(directory: Path, hosts: list[str]) -> None:
    """A CA, one certificate per component, an operator certificate and the ticket-signing key."""
    if (directory / "ca.key").exists():
        raise SystemExit(f"{directory} already holds a CA; use `vmrepl-certs issue` to add certificates")
    create_ca(directory)
    for name, role in DEFAULT_COMPONENTS:
        issue(directory, name=name, role=role, hosts=hosts)
    create_signing_key(directory)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vmrepl-certs", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("init", help="create a CA, component certificates and the ticket-signing key")
    pi.add_argument("--dir", type=Path, required=True)
    pi.add_argument("--host", action="append", help="DNS name or IP for the certificates (repeatable)")
    ps = sub.add_parser("issue", help="issue one more certificate from an existing CA")
    ps.add_argument("--dir", type=Path, required=True)
    ps.add_argument("--name", required=True)
    ps.add_argument("--role", required=True, choices=ROLES)
    ps.add_argument("--host", action="append")
    pk = sub.add_parser("signing-key", help="create a new ticket-signing key pair")
    pk.add_argument("--dir", type=Path, required=True)
    pk.add_argument("--name", default="controller-signing")
    a = p.parse_args(argv)
    hosts = list(getattr(a, "host", None) or DEFAULT_HOSTS)
    if a.cmd == "init":
        init(a.dir, hosts)
    elif a.cmd == "issue":
        issue(a.dir, name=a.name, role=a.role, hosts=hosts)
    else:
        create_signing_key(a.dir, a.name)
    print(f"wrote certificates to {a.dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
