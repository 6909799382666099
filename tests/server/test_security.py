"""Certificates and site keys: what Flower's SuperLink, SuperNode and `flwr supernode register` read."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from common.errors import ConfigError
from server.security import make_certificates, make_site_key


def test_certificates_have_sans_and_chain_to_the_ca(tmp_path: Path) -> None:
    files = make_certificates(tmp_path, ["127.0.0.1", "localhost", "fl.example.org"])

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    server.verify_directly_issued_by(ca)  # raises if the signature does not match
    key = load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_certificates_refuse_to_overwrite_and_need_a_host(tmp_path: Path) -> None:
    make_certificates(tmp_path, ["127.0.0.1"])
    with pytest.raises(ConfigError, match=r"ca\.crt"):
        make_certificates(tmp_path, ["127.0.0.1"])
    with pytest.raises(ConfigError, match="--host"):
        make_certificates(tmp_path / "other", [])


def test_site_key_is_read_by_flower(tmp_path: Path) -> None:
    files = make_site_key(tmp_path, "site-a")

    private = load_ssh_private_key(files.private_key.read_bytes(), None)  # as flower-supernode reads it
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    public_bytes = try_load_public_key(files.public_key)  # as `flwr supernode register` reads it
    assert len(public_bytes) > 0
    assert files.public_key.read_text().endswith(" site-a\n")


def test_site_key_rejects_bad_names_and_overwrites(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--site"):
        make_site_key(tmp_path, "../evil")
    make_site_key(tmp_path, "site-a")
    with pytest.raises(ConfigError, match=r"site-a\.key"):
        make_site_key(tmp_path, "site-a")
