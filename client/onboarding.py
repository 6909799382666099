"""A site set up from an onboarding kit (``cxr-fl-client init KIT --site-dir DIR ...``).

The kit (common/kit.py) is checked first; then the site folder gets::

    DIR/
      ca.crt              the federation's CA, copied from the kit
      SITE.key            the site's own private key (0600; made here, never sent anywhere)
      SITE.pub            its public key: the only file that goes back to the coordinator
      site-policy.toml    the site's policy: its own limits, tightened by the kit's template
      site.json           the coordinator, its CA fingerprint, the kit's app hash (information)
      start.sh            the exact ``cxr-fl-client start`` command of this site (0700)
      serve.sh            the same as ``cxr-fl-client serve`` (stays connected across runs; 0700)
      cxr-fl-SITE.service a systemd unit that runs serve.sh as this account (common/kit.py)
      state/              privacy ledger and audit trail (``--state-dir``)
      out/                outputs and the decoded-image cache of the site's runs

The folder is 0700. A site folder already set up for another coordinator (another CA) is refused:
a kit cannot silently move a site to another federation. Set up again from a kit of the same
coordinator, the site keeps its key pair. The kit's app hash is recorded for the site's reviewer;
it is never added to the site's allow-list (``start --allow-app`` is the site's decision).
"""

from __future__ import annotations

import getpass
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from common.kit import KitFacts, site_service_unit
from common.pki import make_site_key
from common.processes import console_script
from common.site_limits import PolicyFile

SITE_FILE = "site.json"
POLICY_FILE = "site-policy.toml"


@dataclass(frozen=True)
class SiteSetup:
    """What ``init`` wrote."""

    folder: Path
    public_key: Path
    policy: PolicyFile
    start_command: list[str]
    new_key: bool


def _check_same_coordinator(site_dir: Path, kit: KitFacts) -> bool:
    """True when ``site_dir`` was set up before (for this coordinator; ConfigError for another)."""
    path = site_dir / SITE_FILE
    if not path.is_file():
        return False
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "--site-dir", str(site_dir), f"a site folder with a readable site.json ({exc})"
        ) from None
    if before.get("ca_sha256") != kit.ca_sha256 or before.get("site") != kit.site:
        raise ConfigError(
            "KIT",
            str(kit.folder),
            f"a kit of the coordinator {site_dir} was set up for ({before.get('server')}, site "
            f"'{before.get('site')}'): this kit is another coordinator's or another site's; "
            "use a new --site-dir",
        )
    return True


def start_command(
    kit: KitFacts, site_dir: Path, data: Path | None, fmt: str, task: str, image_size: int
) -> list[str]:
    command = [
        "cxr-fl-client",
        "start",
        "--server",
        kit.server,
        "--site",
        kit.site,
        "--ca",
        str(site_dir / "ca.crt"),
        "--key",
        str(site_dir / f"{kit.site}.key"),
        "--format",
        fmt,
    ]
    if data is not None:
        command += ["--data", str(data)]
    command += [
        "--out",
        str(site_dir / "out"),
        "--state-dir",
        str(site_dir / "state"),
        "--policy",
        str(site_dir / POLICY_FILE),
        "--task",
        task,
        "--image-size",
        str(image_size),
    ]
    return command


def set_up_site(
    kit: KitFacts,
    site_dir: Path,
    own: PolicyFile,
    *,
    data: Path | None,
    fmt: str,
    task: str,
    image_size: int,
) -> SiteSetup:
    """Write the site folder (see the module docstring) from a checked kit."""
    site_dir = site_dir.resolve()
    again = _check_same_coordinator(site_dir, kit)
    site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    site_dir.chmod(0o700)
    shutil.copyfile(kit.folder / "ca.crt", site_dir / "ca.crt")
    key = site_dir / f"{kit.site}.key"
    new_key = not (again and key.is_file())
    if new_key:
        for stale in (key, site_dir / f"{kit.site}.pub"):
            stale.unlink(missing_ok=True)
        make_site_key(site_dir, kit.site)
    policy = own.tightened_by(kit.policy)
    (site_dir / POLICY_FILE).write_text(
        policy.to_toml(
            f"site policy of {kit.site}: its own limits, tightened by the kit of {kit.server}.\n"
            "Edit to tighten further; `cxr-fl-client start --policy` reads it."
        ),
        encoding="utf-8",
    )
    for folder in ("state", "out"):
        (site_dir / folder).mkdir(mode=0o700, exist_ok=True)
    facts = {
        "site": kit.site,
        "server": kit.server,
        "ca_sha256": kit.ca_sha256,
        "kit_app_hash": kit.app_hash,
        "server_cert_expires": kit.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data_format": fmt,
        "data": None if data is None else str(data),
    }
    (site_dir / SITE_FILE).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    command = start_command(kit, site_dir, data, fmt, task, image_size)
    script = site_dir / "start.sh"
    installed = [console_script("cxr-fl-client"), *command[1:]]
    script.write_text(f'#!/bin/sh\nexec {shlex.join(installed)} "$@"\n', encoding="utf-8")
    script.chmod(0o700)
    serve = site_dir / "serve.sh"
    serving = [installed[0], "serve", *installed[2:]]
    serve.write_text(f'#!/bin/sh\nexec {shlex.join(serving)} "$@"\n', encoding="utf-8")
    serve.chmod(0o700)
    unit = site_service_unit(kit.site, site_dir, getpass.getuser())
    (site_dir / f"cxr-fl-{kit.site}.service").write_text(unit, encoding="utf-8")
    return SiteSetup(site_dir, site_dir / f"{kit.site}.pub", policy, command, new_key)
