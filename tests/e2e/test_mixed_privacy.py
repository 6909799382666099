"""A site under its own DP budget and a site without DP train together (issue 24, item 9).

Real processes as in test_federation.py: `cxr-fl-server` with DP off, site-a started with
`--epsilon` (its own budget), site-b without DP but sharing its per-class metrics, so the two
send different metric keys in every phase. The run goes through every phase: teacher rounds
with in-train validation, the final validation, the distillation round, and a federated student
round, which the DP site declines by design while the other site carries it.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.harness import Federation

pytestmark = pytest.mark.slow  # make test-slow: a federation through every phase

MIXED_RUN = """\
num-rounds = 2
min-train-sites = 1
min-evaluate-sites = 2
min-available-sites = 2
"""


def test_a_dp_site_and_a_site_without_dp_complete_every_phase(federation: Federation) -> None:
    federation.prepare("site-a", "site-b")
    server = federation.start_server("--config", str(federation.write_config(MIXED_RUN)))
    federation.wait_listening()
    ledger = federation.root / "site-a-privacy" / "ledger.json"  # the site's state stays in the test
    dp_site = federation.start_client("site-a", "--epsilon", "8", "--privacy-ledger", str(ledger))
    other = federation.start_client("site-b", "--share-per-class-metrics")

    assert federation.wait(server, "server", 600) == 0, federation.output("server")
    assert federation.wait(dp_site, "site-a", 60) == 0, federation.output("site-a")
    assert federation.wait(other, "site-b", 60) == 0, federation.output("site-b")
    rows = federation.metrics()
    # teacher rounds: both sites trained in both rounds (site-a under DP: it declines the
    # federated student below, as only a site under DP does)
    aggregates = [r for r in rows if r["phase"] == "aggregate"]
    assert [(r["round"], r["sites_trained"]) for r in aggregates] == [(1, 2), (2, 2)]
    train = {(r["round"], r["site"]): r for r in rows if r["phase"] == "train"}
    assert {key: r["status"] for key, r in train.items()} == {
        (1, "site-a"): "ok",
        (1, "site-b"): "ok",
        (2, "site-a"): "ok",
        (2, "site-b"): "ok",
    }
    # validation of both rounds' models (round 2's by the final evaluation) by both sites
    evaluated = sorted(
        (r["round"], r["site"]) for r in rows if r["phase"] == "evaluate" and r["status"] == "ok"
    )
    assert evaluated == [(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")]
    assert all("val_auroc_macro" in r for r in aggregates)
    # distillation at both sites; the federated student without the DP site, which declined it
    distilled = sorted(r["site"] for r in rows if r["phase"] == "distill" and r["status"] == "ok")
    assert distilled == ["site-a", "site-b"]
    student = {r["site"]: r["status"] for r in rows if r["phase"] == "student"}
    assert student == {"site-a": "declined", "site-b": "ok"}
    summary = json.loads((federation.run_dir / "summary.json").read_text())
    assert summary["federated_student"].startswith("delivered after 1 round")
    for site in ("site-a", "site-b"):
        assert (federation.root / site / "student" / "student.onnx").is_file()
    assert "InconsistentMessageReplies" not in federation.output("server")
    assert "run finished" in federation.output("server")
