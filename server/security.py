"""Certificates and site keys of a federation: what the coordinator makes before anyone connects.

- :func:`make_certificates` writes a CA (``ca.crt``, ``ca.key``) and a server certificate
  (``server.crt``, ``server.key``) signed by it, with a subject alternative name for every host
  name or IP address the sites will use to reach the SuperLink. Sites get ``ca.crt`` only.
- :func:`make_site_key` (common/pki.py, shared with ``cxr-fl-client init``) writes a site's ECDSA
  (NIST P-384) key pair in the OpenSSH formats Flower reads: ``NAME.key`` for ``flower-supernode
  --auth-supernode-private-key`` (stays at the site) and ``NAME.pub`` for ``flwr supernode
  register`` (goes to the coordinator). A site onboarded with a kit makes its own.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from common.pki import SiteKeyFiles, check_site_name, make_site_key, write_private

__all__ = [
    "CertificateFiles",
    "SiteKeyFiles",
    "check_site_name",
    "make_certificates",
    "make_site_key",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertificateFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


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
        write_private(
            path,
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
    logger.info("Wrote a CA and a server certificate for %s in %s", ", ".join(hosts), out_dir)
    return files
