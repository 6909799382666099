"""An evaluation-only run of the ServerApp (run setting ``evaluate-model``): every site scores one model.

The model file at the coordinator is read and checked again (common/model_exchange.py: weights
or a standard-operator ONNX file, never code), sent to the connected sites (those named in
``evaluate-sites``, by their registered names, else every one) in one ``evaluate.model``
message each, and the sites' replies (aggregates only: client/model_evaluation.py) become the
cross-site table and forest plot in ``RUN_DIR/evaluations/run-<flower run id>/``
(server/cross_site_report.py). Sites that decline (their policy leaves out the evaluation
phase), fail or do not answer are listed with the reason their reply carried.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.checkpoint import sha256_file
from common.model_exchange import ONNX, EvaluationModel, onnx_array, read_evaluation_model
from common.protocol import (
    EVALUATE_MODEL_FORMAT_KEY,
    EVALUATE_MODEL_MESSAGE_TYPE,
    EVALUATE_MODEL_ROLE_KEY,
    ONNX_MODEL_RECORD,
)
from common.run_settings import FederatedRunConfig
from server.cross_site_report import site_row, write_cross_site_report
from server.rounds import collect, wait_for_sites
from server.site_identity import SiteDirectory

logger = logging.getLogger(__name__)

EVALUATIONS_DIR = "evaluations"


def evaluation_folder(run_dir: Path, flower_run_id: int) -> Path:
    """Where the cross-site table of Flower run ``flower_run_id`` is written."""
    return run_dir / EVALUATIONS_DIR / f"run-{flower_run_id}"


def wanted_sites(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def evaluation_content(model: EvaluationModel) -> RecordDict:
    """The message's records: the model (weights, or the ONNX file's bytes) and how to load it."""
    config = ConfigRecord(
        {EVALUATE_MODEL_FORMAT_KEY: model.model_format, EVALUATE_MODEL_ROLE_KEY: model.role}
    )
    if model.model_format == ONNX:
        return RecordDict(
            {ONNX_MODEL_RECORD: ArrayRecord({"model": Array(onnx_array(model.onnx_bytes))}), "config": config}
        )
    return RecordDict({"arrays": ArrayRecord(dict(model.state)), "config": config})


def _destinations(grid: Grid, settings: FederatedRunConfig, names: SiteDirectory, minimum: int) -> list[int]:
    nodes = wait_for_sites(grid, minimum, settings.run.site_wait_timeout)
    wanted = wanted_sites(settings.run.evaluate_sites)
    if not wanted or not names.registered:  # self-declared names: filtered on the replies
        return nodes
    return [node for node in nodes if names.registered.get(node) in wanted]


def evaluate_everywhere(
    grid: Grid, settings: FederatedRunConfig, run_dir: Path, flower_run_id: int, min_sites: int
) -> Path:
    """Send the model to the sites, collect their figures, write the table; returns its folder."""
    model = read_evaluation_model(Path(settings.run.evaluate_model))
    names = SiteDirectory(run_dir / "sites.json")
    wanted = wanted_sites(settings.run.evaluate_sites)
    nodes = _destinations(grid, settings, names, len(wanted) or min_sites)
    logger.info("Evaluating %s at %d site(s)", model.describe(), len(nodes))
    messages = [
        Message(evaluation_content(model), dst_node_id=node, message_type=EVALUATE_MODEL_MESSAGE_TYPE)
        for node in nodes
    ]
    _, outcomes = collect(grid, messages, settings.run.distill_round_timeout, names)
    rows = [
        site_row(o.site, o.status, o.reason, o.metrics) for o in outcomes if not wanted or o.site in wanted
    ]
    for row in rows:
        if row["status"] != "ok":
            logger.warning("Evaluation at site %s %s: %s", row["site"], row["status"], row["reason"])
    answered = {row["site"] for row in rows}
    rows += [site_row(site, "absent", "not connected", {}) for site in wanted if site not in answered]
    folder = evaluation_folder(run_dir, flower_run_id)
    described = {
        "name": model.path.name,
        "description": model.describe(),
        "sha256": sha256_file(model.path),
        "format": model.model_format,
        "role": model.role,
        "task": model.task.name,
        "image_size": model.image_size,
    }
    write_cross_site_report(folder, described, rows)
    logger.info("Cross-site table: %s", folder / "cross_site.md")
    return folder
