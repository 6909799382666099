"""An evaluation-only run of the ServerApp (run setting ``evaluate-model``): every site scores one model.

The model file at the coordinator is read and checked again (common/model_exchange.py: weights
or a standard-operator ONNX file, never code), sent to the connected sites (those named in
``evaluate-sites``, by their registered names, else every one) in one ``evaluate.model``
message each, and the sites' replies (aggregates only: client/model_evaluation.py) become the
cross-site table and forest plot in ``RUN_DIR/evaluations/run-<flower run id>/``
(server/cross_site_report.py). Sites that decline (their policy leaves out the evaluation
phase), fail or do not answer are listed with the reason their reply carried.

At the end of a training run with ``cross-site-matrix`` (:func:`cross_site_matrix`), each site
is asked for its delivered student; the sites that opted in and do not train under DP send it
(client/model_evaluation.py), and each one is scored at every other site the same way: the
matrix (``cross_site_matrix.md``/``.json`` in the run folder) lists, per student, each other
site's figures, and the sites that kept theirs with their reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.checkpoint import sha256_file
from common.errors import ModelError
from common.model_exchange import ONNX, EvaluationModel, check_onnx_bytes, onnx_array, read_evaluation_model
from common.protocol import (
    DELIVERED_STUDENT_MESSAGE_TYPE,
    EVALUATE_MODEL_FORMAT_KEY,
    EVALUATE_MODEL_MESSAGE_TYPE,
    EVALUATE_MODEL_ROLE_KEY,
    ONNX_MODEL_RECORD,
)
from common.run_settings import FederatedRunConfig
from server.cross_site_report import site_row, write_cross_site_report, write_matrix_report
from server.rounds import collect, wait_for_sites
from server.run_folder import CoordinatorFolder
from server.site_identity import SiteDirectory

logger = logging.getLogger(__name__)


def evaluation_folder(run_dir: Path, flower_run_id: int) -> Path:
    """Where the cross-site table of Flower run ``flower_run_id`` is written."""
    return CoordinatorFolder(run_dir).evaluation_dir(flower_run_id)


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
    names = SiteDirectory(CoordinatorFolder(run_dir).sites_path)
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


def _shared_students(
    grid: Grid, settings: FederatedRunConfig, names: dict[int, str]
) -> tuple[dict[str, bytes], list[dict[str, str]]]:
    """The delivered students of the sites that share theirs (checked ONNX), and why others did not."""
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({})}),
            dst_node_id=node,
            message_type=DELIVERED_STUDENT_MESSAGE_TYPE,
        )
        for node in sorted(grid.get_node_ids())
    ]
    replies, outcomes = collect(grid, messages, settings.run.round_timeout, names)
    students: dict[str, bytes] = {}
    kept: list[dict[str, str]] = [{"site": o.site, "reason": o.reason} for o in outcomes if o.status != "ok"]
    by_node = {o.node_id: o.site for o in outcomes}
    for reply in replies:
        if reply.has_error():  # declined or failed: in ``kept`` with its reason already
            continue
        site = by_node.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        record = reply.content.array_records.get(ONNX_MODEL_RECORD) if reply.has_content() else None
        try:
            if record is None or len(record) != 1:
                raise ModelError("its reply holds no ONNX model")
            model = next(iter(record.values())).numpy()
            if model.dtype != np.uint8 or model.ndim != 1:
                raise ModelError("its ONNX model is not a byte array")
            check_onnx_bytes(model.tobytes())
        except ModelError as exc:
            logger.warning("Cross-site matrix: the student of site %s is left out: %s", site, exc)
            kept.append({"site": site, "reason": f"its student was refused: {exc}"})
            continue
        students[site] = model.tobytes()
    return students, kept


def cross_site_matrix(
    grid: Grid, settings: FederatedRunConfig, out_dir: Path, names: dict[int, str]
) -> Path | None:
    """Every shared delivered student scored at every other site (``cross-site-matrix``); the
    matrix goes to ``OUT_DIR/cross_site_matrix.md``/``.json``. None when no site shared one."""
    students, kept = _shared_students(grid, settings, names)
    if not students:
        logger.info("Cross-site matrix: no site shares its delivered student")
        write_matrix_report(out_dir, [], kept)
        return None
    rows: list[dict[str, Any]] = []
    for origin, data in sorted(students.items()):
        model = EvaluationModel(
            Path(f"{origin}.onnx"),
            ONNX,
            "student",
            settings.task,
            settings.run.image_size,
            settings.run.preprocess_equalize,
            onnx_bytes=data,
        )
        nodes = [node for node in sorted(grid.get_node_ids()) if names.get(node) != origin]
        messages = [
            Message(evaluation_content(model), dst_node_id=node, message_type=EVALUATE_MODEL_MESSAGE_TYPE)
            for node in nodes
        ]
        _, outcomes = collect(grid, messages, settings.run.distill_round_timeout, names)
        rows += [
            {"student_of": origin, **site_row(o.site, o.status, o.reason, o.metrics)}
            for o in outcomes
            if o.site != origin
        ]
    return write_matrix_report(out_dir, rows, kept)
