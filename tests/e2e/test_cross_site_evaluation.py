"""Evaluate a delivered student at every site: a training run, then `cxr-fl-server evaluate`.

Two sites set up from kits train and distil over TLS (as in test_consortium.py); then the
coordinator sends site-a's delivered student (its exported ONNX) to both sites in an
evaluation-only run, each site joining again with its `start.sh`. The training run also asks
for the cross-site matrix: site-a opted in, so its delivered student is scored at site-b;
site-b kept its own. The coordinator writes the
cross-site table (markdown + JSON) and the forest plot; both sites' rows hold an AUROC with its
interval and nothing per class (no site opted in). Every process is stopped by its PID tree in
the fixture's teardown.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.harness import SERVER, SITES, Federation, audit_events, kit_and_init, start_with_kits, wait_for

pytestmark = pytest.mark.slow  # make test-slow: a training run, then an evaluation run


def _train(federation: Federation, site_dirs: dict[str, Path]) -> None:
    server = start_with_kits(federation, site_dirs, "num-rounds = 1\ncross-site-matrix = true\n")
    federation.wait_listening()
    shares = {"site-a": ("--share-delivered-student",), "site-b": ()}  # site-a opts in to the matrix
    clients = [
        federation.spawn(site, "sh", str(site_dirs[site] / "start.sh"), "--threads", "1", *shares[site])
        for site in SITES
    ]
    assert federation.wait(server, "server", 420) == 0, federation.output("server")
    for site, client in zip(SITES, clients, strict=True):
        assert federation.wait(client, site, 60) == 0, federation.output(site)


def test_a_delivered_student_is_evaluated_at_both_sites(federation: Federation) -> None:
    federation.make_certs()
    site_dirs = {site: kit_and_init(federation, site) for site in SITES}
    _train(federation, site_dirs)
    student = site_dirs["site-a"] / "out" / "global_student" / "student.onnx"
    assert student.is_file()
    matrix = json.loads((federation.run_dir / "cross_site_matrix.json").read_text())
    assert [(r["student_of"], r["site"], r["status"]) for r in matrix["scores"]] == [
        ("site-a", "site-b", "ok")
    ]
    assert [k["site"] for k in matrix["kept"]] == ["site-b"]  # it did not opt in
    assert "--share-delivered-student" in matrix["kept"][0]["reason"]

    evaluation = federation.spawn(
        "evaluate",
        SERVER,
        "evaluate",
        str(student),
        *federation.coordinator_options(),
        "--site",
        "site-a",
        "--site",
        "site-b",
        "--bootstrap",
        "200",
    )
    wait_for(lambda: "SuperLink listening" in federation.output("evaluate"), 90, "the evaluation's SuperLink")
    clients = [
        federation.spawn(
            f"{site}-eval", "sh", str(site_dirs[site] / "start.sh"), "--threads", "1", "--skip-check"
        )
        for site in SITES
    ]
    assert federation.wait(evaluation, "evaluate", 300) == 0, federation.output("evaluate")
    for site, client in zip(SITES, clients, strict=True):
        assert federation.wait(client, f"{site}-eval", 60) == 0, federation.output(f"{site}-eval")

    folders = sorted((federation.run_dir / "evaluations").iterdir())
    assert len(folders) == 1
    table = json.loads((folders[0] / "cross_site.json").read_text())
    assert table["model"]["format"] == "onnx"
    rows = {row["site"]: row for row in table["sites"]}
    assert set(rows) == set(SITES)
    for row in rows.values():
        assert row["status"] == "ok", row
        auroc = row["auroc_macro"]
        assert 0.0 <= auroc["low"] <= auroc["value"] <= auroc["high"] <= 1.0
        assert row["test_images"] % 10 == 0
        assert "per_class" not in row  # no site opted in
    markdown = (folders[0] / "cross_site.md").read_text()
    assert "| site-a | ok |" in markdown
    assert "| site-b | ok |" in markdown
    assert (folders[0] / "forest_plot.png").stat().st_size > 1000
    assert "cross-site table:" in federation.output("evaluate")
    events = audit_events(federation.run_dir / "audit.jsonl")
    assert events[-1] == "evaluation-finished"
    assert "evaluation-submitted" in events
    keep = os.environ.get("CXR_FL_KEEP_CROSS_SITE")
    if keep:  # the closing note's table and plot from a real run
        shutil.copytree(folders[0], Path(keep), dirs_exist_ok=True)
