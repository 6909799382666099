"""Certificates and site keys of a federation: what the coordinator makes before anyone connects.

- :func:`make_certificates` writes a CA (``ca.crt``, ``ca.key``) and a server certificate
  (``server.crt``, ``server.key``) signed by it, with a subject alternative name for every host
  name or IP address the sites will use to reach the SuperLink. Sites get ``ca.crt`` only.
- :func:`make_site_key` writes a site's ECDSA (NIST P-384) key pair in the OpenSSH formats
  Flower reads: ``NAME.key`` for ``flower-supernode --auth-supernode-private-key`` (stays at the
  site) and ``NAME.pub`` for ``flwr supernode register`` (goes to the coordinator).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

logger = logging.getLogger(__name__)

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class CertificateFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeyFiles:
    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise ConfigError(
            "--site", name, "letters, digits, '.', '_' or '-' (up to 63 characters, e.g. st-marys)"
        )
    return name


def make_certificates(out_dir: Path, hosts: list[str], *, days: int = 825) -> CertificateFiles:
    """A new CA and a server certificate for ``hosts`` (host names or IP addresses)."""
    if not hosts:
        raise ConfigError("--host", hosts, "at least one host name or IP address, e.g. --host 127.0.0.1")
    files = CertificateFiles(
        out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.crt", out_dir / "server.key"
    )
    existing = [str(p) for p in vars(files).values() if p.exists()]
    if existing:
        raise ConfigError(
            "--out", str(out_dir), f"a folder without certificates (found {existing[0]}; choose another)"
        )
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cxr-fl federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    for key, path in ((ca_key, files.ca_key), (server_key, files.server_key)):
        _write_private(
            path,
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
    logger.info("Wrote a CA and a server certificate for %s in %s", ", ".join(hosts), out_dir)
    return files


def make_site_key(out_dir: Path, site: str) -> SiteKeyFiles:
    """A site's authentication key pair (ECDSA P-384, OpenSSH formats)."""
    check_site_name(site)
    files = SiteKeyFiles(out_dir / f"{site}.key", out_dir / f"{site}.pub")
    for path in (files.private_key, files.public_key):
        if path.exists():
            raise ConfigError("--out", str(out_dir), f"a folder without {path.name} (it already exists)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files.public_key.write_bytes(public + f" {site}\n".encode())
    return files
