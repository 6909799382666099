"""Onboarding kits: everything a hospital needs to join, and nothing secret.

``cxr-fl-server kit SITE --out DIR`` writes::

    DIR/
      kit.json            format, site name, the coordinator's address, the app hash its runs
                          carry, the SHA-256 of ca.crt and server.crt, when the certificate expires
      ca.crt              the federation's CA certificate (public)
      server.crt          the certificate the sites' address presents (public): a site checks
                          offline that ca.crt signed it and that it names the address's host
      site-policy.toml    a template of the limits the coordinator's runs need (common/site_limits.py)
      README.md           the exact commands for the site
      cxr-fl-site.service a systemd unit template for the long-running site (``init`` writes the
                          site's own, filled in: common/kit.py ``site_service_unit``)

No private key is made for a site: the site makes its own key pair with ``cxr-fl-client init``
and sends only ``SITE.pub`` back (``cxr-fl-server register-site``). The app hash is information
for the site's reviewer; ``init`` never adds it to the site's allow-list. The kit is refused
(ConfigError) when the certificates do not belong together or do not name the address's host.
The format is common/kit.py's, which also reads and checks a kit at the site.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, CxrFlError
from common.kit import (
    KIT_FILE,
    KIT_FORMAT,
    POLICY_TEMPLATE,
    SERVICE_TEMPLATE,
    site_service_unit,
    split_address,
)
from common.pki import (
    CertificateError,
    certificate_fingerprint,
    check_server_certificate,
    check_site_name,
    load_certificate,
)
from common.processes import console_script, flower_env
from common.site_limits import PolicyFile

__all__ = ["Kit", "app_bundle_hash", "site_readme", "split_address", "write_kit"]


@dataclass(frozen=True)
class Kit:
    """What ``write_kit`` wrote."""

    folder: Path
    app_hash: str
    expires: datetime.datetime


def app_bundle_hash(project_root: Path) -> str:
    """The SHA-256 of the app bundle ``flwr run`` submits from ``project_root`` (Flower's own
    ``flwr build``, run in a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="cxr-fl-fab-") as scratch:
        env = flower_env(Path(scratch) / "flwr-home", {})
        result = subprocess.run(
            [console_script("flwr"), "build", "--app", str(project_root)],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        fabs = list(Path(scratch).glob("*.fab"))
        if result.returncode != 0 or len(fabs) != 1:
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:]
            raise CxrFlError(f"`flwr build --app {project_root}` failed: {' '.join(tail)}")
        return hashlib.sha256(fabs[0].read_bytes()).hexdigest()


def write_kit(site: str, out: Path, certs: Path, address: str, app_hash: str, policy: PolicyFile) -> Kit:
    """Write the onboarding kit of ``site`` to ``out`` (a new or empty folder)."""
    check_site_name(site, "SITE")
    host, _ = split_address(address)
    ca = load_certificate(certs / "ca.crt", "--certs")
    server = load_certificate(certs / "server.crt", "--certs")
    try:
        expires = check_server_certificate(ca, server, host)
    except CertificateError as exc:
        raise ConfigError(
            "--server", address, f"an address the certificates in {certs} name ({exc})"
        ) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", str(out), "a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(certs / "ca.crt", out / "ca.crt")
    shutil.copyfile(certs / "server.crt", out / "server.crt")
    (out / POLICY_TEMPLATE).write_text(
        policy.to_toml(
            f"cxr-fl site policy template for {site}: the limits this coordinator's runs need.\n"
            "`cxr-fl-client init` takes, key by key, the stricter of this and the site's own limits."
        ),
        encoding="utf-8",
    )
    facts = {
        "format": KIT_FORMAT,
        "site": site,
        "server": address,
        "app_hash": app_hash,
        "ca_sha256": certificate_fingerprint(ca),
        "server_cert_sha256": certificate_fingerprint(server),
        "server_cert_expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (out / KIT_FILE).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(site_readme(site, address, app_hash), encoding="utf-8")
    (out / SERVICE_TEMPLATE).write_text(site_service_unit(site, Path("/srv/cxr-fl") / site), encoding="utf-8")
    return Kit(out, app_hash, expires)


def site_readme(site: str, address: str, app_hash: str) -> str:
    return f"""# Joining the cxr-fl federation as `{site}`

Coordinator: `{address}`. This kit holds only public files: the federation's CA certificate
(`ca.crt`), the certificate its address presents (`server.crt`), a template of the limits its
runs need (`site-policy.toml`) and `kit.json`.

1. Install cxr-fl (offline: see docs/consortium.md, "Install offline").
2. Set the site up (makes this site's key pair, writes its policy, checks its data):

       cxr-fl-client init KIT_FOLDER --site-dir /srv/cxr-fl/{site} --data /data/cxr --format image-folder

   `--max-image-size`, `--max-rounds`, ... set the site's own limits; the template can only
   tighten them. `SITE_DIR/{site}.key` is private (0600) and never leaves the site.
3. Send only `SITE_DIR/{site}.pub` to the coordinator, who registers it:

       cxr-fl-server register-site {site}.pub --name {site} --run-dir RUN_DIR

4. Review the app: the coordinator's runs carry app hash `{app_hash}`.
   `cxr-fl-client app-hash` prints the hash of the cxr-fl you installed; the site runs only
   that one unless you add another with `--allow-app` after reviewing it.
5. Join: `init` prints the exact `cxr-fl-client start ...` command (also in `SITE_DIR/start.sh`)
   for one run; `SITE_DIR/serve.sh` (`cxr-fl-client serve`) stays connected across runs, and
   `SITE_DIR/cxr-fl-{site}.service` runs it as a systemd service (this kit's `cxr-fl-site.service`
   is the same unit for `/srv/cxr-fl/{site}`).
6. Check the site's audit trail at any time: `cxr-fl-client audit verify --site-dir SITE_DIR`.
"""
