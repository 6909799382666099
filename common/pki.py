"""Site key pairs and certificate checks that coordinator and sites share (no Flower imports).

- :func:`make_site_key` writes a site's ECDSA (NIST P-384) key pair in the OpenSSH formats Flower
  reads: ``NAME.key`` (0600; ``flower-supernode --auth-supernode-private-key``; never leaves the
  site) and ``NAME.pub`` (``flwr supernode register``; goes to the coordinator). A site makes its
  own with ``cxr-fl-client init``.
- :func:`check_server_certificate` checks that a server certificate was signed by a CA, names a
  host (subject alternative names) and is in its validity period: what an onboarding kit's
  ``ca.crt`` and address must agree on.
- :func:`public_key_fingerprint` / :func:`certificate_fingerprint`: SHA-256 of a public key body
  or of a certificate (DER), as recorded in kits and audit logs.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError, CxrFlError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
EXPIRY_WARNING_DAYS = 30
"""``status`` warns when the server certificate expires within this many days."""


class CertificateError(CxrFlError):
    """A certificate does not fit: wrong CA, wrong host, expired or unreadable."""


@dataclass(frozen=True)
class SiteKeyFiles:
    private_key: Path
    public_key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new 0600 file (replacing any)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def check_site_name(name: str, option: str = "--site") -> str:
    if not SITE_NAME.match(name):
        raise ConfigError(
            option, name, "letters, digits, '.', '_' or '-' (up to 63 characters, e.g. st-marys)"
        )
    return name


def make_site_key(out_dir: Path, site: str) -> SiteKeyFiles:
    """A site's authentication key pair (ECDSA P-384, OpenSSH formats)."""
    check_site_name(site)
    files = SiteKeyFiles(out_dir / f"{site}.key", out_dir / f"{site}.pub")
    for path in (files.private_key, files.public_key):
        if path.exists():
            raise ConfigError("--out", str(out_dir), f"a folder without {path.name} (it already exists)")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files.public_key.write_bytes(public + f" {site}\n".encode())
    return files


def public_key_body(text: str) -> str:
    """``TYPE BASE64`` of an OpenSSH public key line (the comment left out)."""
    return " ".join(text.split()[:2])


def public_key_fingerprint(text: str) -> str:
    return hashlib.sha256(public_key_body(text).encode()).hexdigest()


def load_certificate(path: Path, option: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(option, str(path), "an existing PEM certificate") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(option, str(path), f"a PEM certificate ({exc})") from None


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName)
    )


def _same_host(name: str, host: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(host)
    except ValueError:
        return name.lower() == host.lower()


def check_server_certificate(ca: x509.Certificate, server: x509.Certificate, host: str) -> datetime.datetime:
    """CertificateError unless ``server`` is signed by ``ca``, names ``host`` and is valid now;
    returns when it expires."""
    public_key = ca.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or server.issuer != ca.subject:
        raise CertificateError("the server certificate was not issued by this CA (ca.crt)")
    algorithm = server.signature_hash_algorithm
    if algorithm is None:
        raise CertificateError("the server certificate has no signature hash algorithm")
    try:
        public_key.verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise CertificateError("the server certificate was not signed by this CA (ca.crt)") from None
    names = _names(server)
    if not any(_same_host(name, host) for name in names):
        raise CertificateError(
            f"the server certificate is for {', '.join(names) or 'no host'}, not for {host}: "
            "the CA and the address do not belong together"
        )
    now = datetime.datetime.now(datetime.UTC)
    if server.not_valid_after_utc <= now:
        raise CertificateError(f"the server certificate expired on {server.not_valid_after_utc:%Y-%m-%d}")
    return server.not_valid_after_utc


def days_left(cert: x509.Certificate) -> float:
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return remaining.total_seconds() / 86400.0
