"""The onboarding kit's format: what ``cxr-fl-server kit`` writes and ``cxr-fl-client init`` reads.

A kit is a folder of public files (server/kit.py writes it): ``kit.json``, ``ca.crt``,
``server.crt``, ``site-policy.toml``, ``README.md`` and ``cxr-fl-site.service`` (a systemd unit
template for the long-running site: :func:`site_service_unit`). :func:`read_kit` checks it before a site
uses any of it, each failure a ConfigError naming the file: the format, the site name, the
address, the app hash, that ``ca.crt`` and ``server.crt`` are the ones ``kit.json`` names (a kit
put together from two coordinators' files fails here), that ``ca.crt`` signed ``server.crt`` and
that the certificate names the address's host (a kit whose CA does not match its address), and
the policy template (unknown keys, impossible values).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.pki import (
    CertificateError,
    certificate_fingerprint,
    check_server_certificate,
    check_site_name,
    load_certificate,
)
from common.site_limits import PolicyFile, read_policy_file

KIT_FORMAT = "cxr-fl-kit/1"
KIT_FILE = "kit.json"
POLICY_TEMPLATE = "site-policy.toml"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class KitFacts:
    """A checked kit."""

    folder: Path
    site: str
    server: str
    app_hash: str
    ca_sha256: str
    policy: PolicyFile
    expires: datetime.datetime


def split_address(address: str, option: str = "--server") -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (ConfigError naming ``option`` otherwise)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(option, address, "HOST:PORT, e.g. coordinator.example.org:9092")
    return host.strip("[]"), int(port)


def _field(facts: dict[str, Any], key: str, where: str) -> str:
    value = facts.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}'", value, "text: this is not a complete cxr-fl kit")
    return value


def read_kit(folder: Path) -> KitFacts:
    """The kit in ``folder``, checked (see the module docstring)."""
    where = str(folder / KIT_FILE)
    try:
        facts = json.loads((folder / KIT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            "KIT", str(folder), f"a kit folder made by `cxr-fl-server kit` (no {KIT_FILE})"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError("KIT", where, f"a readable kit.json ({exc})") from None
    if not isinstance(facts, dict) or facts.get("format") != KIT_FORMAT:
        raise ConfigError(where, facts.get("format") if isinstance(facts, dict) else facts, KIT_FORMAT)
    site = check_site_name(_field(facts, "site", where), f"{where}: 'site'")
    server = _field(facts, "server", where)
    host, _ = split_address(server, f"{where}: 'server'")
    app_hash = _field(facts, "app_hash", where)
    if not _SHA256.match(app_hash):
        raise ConfigError(f"{where}: 'app_hash'", app_hash, "a SHA-256 of 64 lower-case hex digits")
    ca = load_certificate(folder / "ca.crt", "KIT/ca.crt")
    server_cert = load_certificate(folder / "server.crt", "KIT/server.crt")
    for name, cert, key in (("ca.crt", ca, "ca_sha256"), ("server.crt", server_cert, "server_cert_sha256")):
        if certificate_fingerprint(cert) != _field(facts, key, where):
            raise ConfigError(
                f"KIT/{name}",
                str(folder / name),
                f"the certificate kit.json names ({key}): this {name} belongs to another coordinator's kit",
            )
    try:
        expires = check_server_certificate(ca, server_cert, host)
    except CertificateError as exc:
        raise ConfigError(f"{where}: 'server'", server, f"an address its CA vouches for ({exc})") from None
    policy = read_policy_file(folder / POLICY_TEMPLATE, "KIT/" + POLICY_TEMPLATE)
    return KitFacts(folder, site, server, app_hash, certificate_fingerprint(ca), policy, expires)


SERVICE_TEMPLATE = "cxr-fl-site.service"
"""The kit's systemd unit template (``cxr-fl-client init`` writes the site's own, filled in)."""


def site_service_unit(site: str, site_dir: Path, user: str | None = None) -> str:
    """A systemd unit that keeps the site up across runs (``SITE_DIR/serve.sh``, i.e.
    ``cxr-fl-client serve``), restarted after a failure, stopped by SIGTERM (its exit code 130
    is a clean stop), its files private to the site's account (UMask 0077)."""
    check_site_name(site, "SITE")
    account = f"User={user}\n" if user else "# User=cxr-fl   (the account that owns the site folder)\n"
    return f"""# cxr-fl site {site}: copy to /etc/systemd/system/cxr-fl-{site}.service, then
#   systemctl daemon-reload && systemctl enable --now cxr-fl-{site}
[Unit]
Description=cxr-fl site {site} (federated chest X-ray learning, connected across runs)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
{account}WorkingDirectory={site_dir}
ExecStart=/bin/sh {site_dir}/serve.sh
Restart=on-failure
RestartSec=30
KillSignal=SIGTERM
TimeoutStopSec=120
SuccessExitStatus=130
UMask=0077
NoNewPrivileges=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""
