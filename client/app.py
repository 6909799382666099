"""The Flower ClientApp of a hospital site: teacher rounds, federated validation, distillation.

Also the BatchNorm statistics of a global model over the site's train split (``query.bn_statistics``,
run setting ``bn-statistics``): per-layer moments and the image count, declined under DP.

Wiring only: Context -> typed settings on the first lines, then common/local.py does the work.
Replies carry the model weights (teacher rounds only), the number of examples and scalar
metrics, plus the site's self-chosen name; never images, labels or per-image outputs. By
default a deployed site rounds its counts and keeps class-revealing metrics at home
(client/disclosure.py). Every handler passes the site's privacy gate first
(client/privacy_gate.py): it declines what the site's privacy forbids in that phase, checks DP
rounds against the site's own ledger before they train (client/privacy_ledger.py) and shapes
what the reply carries; run settings that name files are ignored at a deployed site. Every
message is first admitted by the site's policy and teacher pin (client/admission.py), before
the site loads its data. Every model the site keeps or exports gets the site's own operating
point, fitted on its validation split, and the student it delivers is first checked against the
global teacher on its test split (client/site_operating_point.py). A deployed site's audit trail
(client/site_audit.py) records the runs it declines (with the reason the reply carries) and the
privacy each DP round spent. An evaluation-only run's message (``evaluate.model``) scores a
coordinator's model on the site's test split (client/model_evaluation.py).

A user's mistake (missing data path, classes that differ from the task, a DP budget that cannot
be met) becomes an error reply whose reason the server logs, not a hang or a traceback.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from client.admission import admit
from client.disclosure import Disclosure
from client.model_evaluation import delivered_student, evaluate_model
from client.privacy_gate import (
    BN_STATISTICS,
    DISTILLATION,
    FEDERATED_STUDENT,
    STUDENT_FINAL,
    TEACHER_ROUND,
    VALIDATION,
    PrivacyGate,
)
from client.privacy_ledger import LedgerIntegrityError
from client.site import (
    SiteConfig,
    for_run,
    is_simulated,
    site_from_node_config,
    site_name_for_partition,
    site_run_config,
)
from client.site_audit import record_site_event, site_audit_head
from client.site_operating_point import (
    AtOperatingPoint,
    check_before_delivery,
    fit_at_site,
    load_teacher_point,
    save_teacher_point,
    score_at_site,
)
from client.site_policy import SitePolicyError
from client.site_privacy import site_disclosure
from common.batchnorm_stats import site_moments
from common.checkpoint import load_model_state, save_model
from common.config import ModelConfig
from common.errors import CxrFlError, DataError
from common.export import model_metadata
from common.jsonio import write_json
from common.local import (
    EVAL_BATCH_SIZE,
    DataRequest,
    DeliveredStudent,
    DistillOutcome,
    SiteData,
    build_loaded_model,
    choose_delivered_student,
    derive_seed,
    distill_student,
    evaluate_state,
    load_site_data,
    scalar_metrics,
    site_data_request,
    student_config,
    train_round,
)
from common.models import build_model
from common.operating_point import OperatingPoint
from common.packing import PackedModelError
from common.privacy import BudgetExhaustedError
from common.protocol import (
    AUDIT_RECORD,
    BN_MODEL_KEY,
    BN_MODELS,
    BN_STATISTICS_RECORD,
    RUN_FINISHED_MARKER,
    SITE_BAD_INPUT,
    SITE_DECLINED,
    SITE_FAILED,
    SITE_RECORD,
    STUDENT_START_KEY,
    VALIDATE_INCOMING_KEY,
    VALIDATION_RECORD,
    WEIGHT_KEY,
    error_reason,
)
from common.run_settings import FederatedRunConfig, run_settings_from_config
from common.training import EvalResult
from flower_adapter.central_dp import KEY_CLIPPING_NORM, clip_update
from flower_adapter.packed_arrays import is_packed, pack_content, unpack_content

logger = logging.getLogger(__name__)


def packed_arrays_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Unpack the model of a packed message (flower_adapter/packed_arrays.py) for the handlers, and pack
    the model of their reply the same way. A packed model that does not unpack (its layout and
    buffers disagree, an unknown dtype...) is refused with an error reply saying why."""
    if not msg.has_content() or not is_packed(msg.content):
        return call_next(msg, context)
    try:
        msg.content = unpack_content(msg.content)
    except PackedModelError as exc:
        logger.error("Refused the server's message: %s", exc)
        return _outgoing(msg, context, Error(SITE_BAD_INPUT, str(exc)))
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content, _ = pack_content(reply.content)
    return reply


app = ClientApp(mods=[packed_arrays_mod])

GLOBAL_TEACHER_FILE = "global_teacher.pt"
# its logits of this site's un-augmented train split, reused by every federated-student round
GLOBAL_TEACHER_LOGITS_FILE = "global_teacher_logits.pt"
# the global teacher with its BatchNorm statistics re-estimated on this site's train split
# (kd-recalibrate-bn): the federated-student rounds distil from it without re-estimating again
SITE_BN_TEACHER_FILE = "global_teacher_site_bn.pt"
NO_KD_STUDENT_FILE = "nokd_student.pt"
"""The student trained without KD (``kd-no-kd-baseline``), kept beside the exported student."""

Handler = Callable[[Message, FederatedRunConfig, SiteConfig, SiteData, PrivacyGate], RecordDict]
"""A phase's handler: the message, the run's settings, the site, its data and the site's privacy
gate for this message (whose :meth:`~PrivacyGate.enter` it calls first)."""


def data_request(settings: FederatedRunConfig, site: SiteConfig) -> DataRequest:
    return site_data_request(
        settings.run, settings.task, site.data_format, site.data_path, site.cache_dir, strict=site.strict
    )


def _site_seed(site: SiteConfig, *parts: object) -> int:
    """The seed of a random choice at this site (data order, augmentation, dropout, the student's
    start). A simulated site derives it from ``parts`` (run seed, phase, round, name), so studies
    repeat; a deployed site draws it from its own entropy: every part is known to the
    coordinator, and what it shapes leaves the site in the weights."""
    return derive_seed(*parts) if site.simulated else secrets.randbits(31)


def _dp_seed(site: SiteConfig, *parts: object) -> int | None:
    """The seed of DP-SGD's noise and sampling: only a simulated site (the coordinator's own
    partition) has one; a deployed site's come from the OS's entropy (common/privacy.py)."""
    return derive_seed(*parts, "dp") if site.simulated else None


def _site_label(context: Context) -> str:
    """The site's name for error replies, even when its node_config could not be read."""
    if "site-name" in context.node_config:
        return str(context.node_config["site-name"])
    if "partition-id" in context.node_config:
        return site_name_for_partition(int(context.node_config["partition-id"]))
    return f"node-{context.node_id}"


def _disclosure(context: Context) -> Disclosure:
    """What this site's replies may carry, by its node_config alone (client/site_privacy.py)."""
    return site_disclosure(context.node_config, simulated=is_simulated(context.node_config))


def _outgoing(
    msg: Message, context: Context, reply: RecordDict | Error, gate: PrivacyGate | None = None
) -> Message:
    """The one way out of this ClientApp: every reply and every error text leaves through here,
    shaped by the site's disclosure (client/disclosure.py: coarse numbers, no class-revealing
    metrics unless the site opted in, nothing computed on the training split under DP, no
    paths or counts in error texts): a phase's reply through its privacy gate, anything else
    (errors, the finish reply) by the disclosure of the site's node_config."""
    disclosure = _disclosure(context)
    if isinstance(reply, Error):
        text = disclosure.text(reply.reason or "")
        return Message(Error(reply.code, error_reason(_site_label(context), text)), reply_to=msg)
    for name, record in list(reply.metric_records.items()):
        reply[name] = MetricRecord(gate.reply_metrics(record) if gate else disclosure.metrics(record))
    return Message(reply, reply_to=msg)


def _reply(msg: Message, context: Context, handler: Handler) -> Message:
    """Run a handler; turn known failures into error replies with a reason."""
    site: SiteConfig | None = None
    try:
        settings = run_settings_from_config(site_run_config(context.node_config, context.run_config))
        site = for_run(
            site_from_node_config(context.node_config, settings), context.node_config, context.run_id
        )
        site.out_dir.mkdir(parents=True, exist_ok=True)
        journal = admit(msg, context, settings, site)  # the site's policy and pin, before any work
        data = load_site_data(data_request(settings, site))
        gate = PrivacyGate(site, settings, data, context.run_id)
        content = handler(msg, settings, site, data, gate)
        if journal is not None:
            journal.mark_completed(msg.metadata.message_type)
        content[SITE_RECORD] = ConfigRecord({"name": site.name})
        return _outgoing(msg, context, content, gate)
    except (BudgetExhaustedError, LedgerIntegrityError, SitePolicyError) as exc:
        logger.warning("Declining: %s", exc)
        _audit_declined(site, context, str(exc))
        return _outgoing(msg, context, Error(SITE_DECLINED, str(exc)))
    except CxrFlError as exc:
        logger.error("Site cannot take part: %s", exc)
        _audit_declined(site, context, str(exc))
        return _outgoing(msg, context, Error(SITE_BAD_INPUT, str(exc)))
    except Exception as exc:  # a bug at one site must not hang the federation
        logger.exception("Site failed")
        return _outgoing(msg, context, Error(SITE_FAILED, f"{type(exc).__name__}: {exc}"))


def _audit_declined(site: SiteConfig | None, context: Context, reason: str) -> None:
    """The decline in the site's audit trail, with the reason exactly as its reply carries it."""
    if site is not None and not site.simulated:
        text = _disclosure(context).text(reason)
        record_site_event(site.state_dir, "run-declined", run_id=context.run_id, reason=text)


def _train(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    gate.enter(TEACHER_ROUND)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    num_rounds = int(config.get("num-rounds", settings.run.num_rounds))
    train = replace(
        settings.train,
        proximal_mu=float(config.get("proximal-mu", settings.train.proximal_mu)),
        num_threads=site.num_threads,
    )
    global_state = msg.content["arrays"].to_torch_state_dict()
    validation = _validate_incoming(config, settings, site, data, global_state)
    dp_round = gate.teacher_round()  # fail closed: an unverifiable ledger raises before anything trains
    outcome = train_round(
        data,
        settings.task,
        settings.teacher,
        global_state,
        train,
        seed=_site_seed(site, settings.train.seed, server_round, site.name),
        privacy=gate.privacy,
        dp_plan=dp_round.plan if dp_round else None,
        dp_history=dp_round.history if dp_round else None,
        dp_seed=_dp_seed(site, settings.train.seed, server_round, site.name),
        num_rounds=num_rounds,
        compute=site.resolve_compute(dp=gate.under_dp),
    )
    if dp_round is not None:  # recorded; weights of a round over the budget never leave
        dp_round.spend(outcome.plan, outcome.history, server_round)
    metrics = MetricRecord({WEIGHT_KEY: len(data.split.train), **outcome.metrics})
    trained = outcome.state_dict
    if KEY_CLIPPING_NORM in config:  # central DP (server/central_dp.py): the update leaves clipped
        trained = clip_update(global_state, trained, config[KEY_CLIPPING_NORM])
    reply = RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics})
    if validation is not None:
        reply[VALIDATION_RECORD] = validation
    return reply


def _validate_incoming(
    config: ConfigRecord,
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    state: dict[str, torch.Tensor],
) -> MetricRecord | None:
    """Scores of the global model a train message brought, when the server asks for them.

    With ``validation-mode = "in-train"`` the server validates the global model of round r-1
    inside round r's train message (one message per site per round): the site scores the
    model it received on its validation split before training on it.
    """
    if config.get(VALIDATE_INCOMING_KEY) is not True:
        return None
    return _validation_scores(settings, site, data, state)


def _validation_scores(
    settings: FederatedRunConfig, site: SiteConfig, data: SiteData, state: dict[str, torch.Tensor]
) -> MetricRecord:
    compute = site.resolve_compute()
    result = evaluate_state(data, "val", settings.task, settings.teacher, state, compute=compute)
    return MetricRecord({WEIGHT_KEY: result.n, **scalar_metrics(result, "val_")})


def _evaluate(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    gate.enter(VALIDATION)
    state = msg.content["arrays"].to_torch_state_dict()
    return RecordDict({"metrics": _validation_scores(settings, site, data, state)})


def _distill_at_site(
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    teacher_state: dict[str, torch.Tensor],
    *,
    seed: int,
    **options: Any,
) -> DistillOutcome:
    """:func:`distill_student` with the run's task, teacher and KD settings, on the site's
    threads and device."""
    return distill_student(
        data,
        settings.task,
        settings.teacher,
        teacher_state,
        settings.distill,
        norm=settings.teacher.norm,
        seed=seed,
        num_threads=site.num_threads,
        compute=site.resolve_compute(),
        **options,
    )


def _distill(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    """Distil this site's student(s) from the global teacher, fit each one's operating point on
    the site's validation split, and export the KD student; a run without federated-student
    rounds delivers it, after the check before delivery."""
    gate.enter(DISTILLATION)
    teacher_state = msg.content["arrays"].to_torch_state_dict()
    seed = _site_seed(site, settings.distill.seed, "distill", site.name)
    compute = site.resolve_compute()
    teacher_point = fit_at_site(
        data, settings.task, settings.teacher, teacher_state, site.operating_point, compute=compute
    )
    site.out_dir.mkdir(parents=True, exist_ok=True)
    save_teacher_point(site.out_dir, teacher_point)
    student_start = _coordinator_student(msg, settings)
    outcome = _distill_at_site(
        settings,
        site,
        data,
        teacher_state,
        seed=seed,
        student_state=student_start,
        start_competes=student_start is not None,
    )
    metrics = dict(outcome.metrics)
    nokd = _no_kd_baseline(settings, site, data, teacher_state, seed, metrics)
    kd = _student_at_site(settings, site, data, outcome.student.state_dict())
    metrics.update(
        _distilled_at_operating_points(settings, site, data, teacher_state, teacher_point, kd, nokd)
    )
    from client.export import EdgeExportOptions, export_site_student  # loaded only for this phase

    if settings.kd_federated_student_rounds > 0:
        _keep_teacher(site, teacher_state, outcome)
    ledger_eps = gate.teacher_epsilon()
    options = EdgeExportOptions(compression=settings.edge_compression, num_threads=site.num_threads)
    metrics.update(
        export_site_student(
            site,
            settings,
            data,
            outcome,
            metrics,
            teacher_epsilon=ledger_eps,
            options=options,
            operating_point=kd.point,
        )
    )
    if ledger_eps is not None:
        metrics["dp_epsilon"] = ledger_eps
    return RecordDict({"metrics": MetricRecord({WEIGHT_KEY: len(data.split.test), **metrics})})


def _distilled_at_operating_points(
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    teacher_state: dict[str, torch.Tensor],
    teacher_point: OperatingPoint,
    kd: AtOperatingPoint,
    nokd: AtOperatingPoint | None,
) -> dict[str, float]:
    """The distilled students' balanced accuracy at their operating points; when the site's own
    KD student is the one it delivers (no federated-student rounds), the check before delivery."""
    figures = {"kd_op_balanced_accuracy": kd.figures(settings.task)["balanced_accuracy"]}
    if nokd is not None:
        figures["nokd_op_balanced_accuracy"] = nokd.figures(settings.task)["balanced_accuracy"]
    if settings.kd_federated_student_rounds > 0:
        return figures
    teacher = score_at_site(
        data,
        settings.task,
        settings.teacher,
        teacher_state,
        site.operating_point,
        point=teacher_point,
        compute=site.resolve_compute(),
    )
    figures.update(
        check_before_delivery(site.out_dir, site.name, settings.task, teacher, kd, nokd=nokd, kd=kd)
    )
    return figures


def _no_kd_baseline(
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    teacher_state: dict[str, torch.Tensor],
    seed: int,
    metrics: dict[str, float],
) -> AtOperatingPoint | None:
    """With ``kd-no-kd-baseline``: the same student trained on the labels alone, kept beside the
    exported one with its operating point; its test figures go into ``metrics`` as ``nokd_*``."""
    if not settings.kd_no_kd_baseline:
        return None
    baseline = _distill_at_site(
        settings, site, data, teacher_state, seed=seed, use_kd=False, evaluate_teacher=False
    )
    metrics.update(
        {k.replace("student_", "nokd_"): v for k, v in baseline.metrics.items() if k.startswith("student_")}
    )
    scored = _student_at_site(settings, site, data, baseline.student.state_dict())
    meta = model_metadata(
        _student_config(settings),
        settings.task,
        settings.run.image_size,
        "student without KD",
        equalize=settings.run.preprocess_equalize,
        operating_point=scored.point,
    )
    save_model(baseline.student, site.out_dir / NO_KD_STUDENT_FILE, metadata=meta)
    return scored


def _keep_teacher(site: SiteConfig, teacher_state: dict[str, torch.Tensor], outcome: DistillOutcome) -> None:
    """Keep the global teacher (its logits, its site-adapted copy) for the federated-student rounds."""
    save_model(teacher_state, site.out_dir / GLOBAL_TEACHER_FILE, metadata={"role": "global teacher"})
    _save_teacher_logits(site, outcome.teacher_logits)
    adapted = site.out_dir / SITE_BN_TEACHER_FILE
    if outcome.teacher_adapted:
        save_model(outcome.teacher, adapted, metadata={"role": "global teacher, site BatchNorm statistics"})
    else:
        adapted.unlink(missing_ok=True)  # never a stale one of an earlier teacher


def _student_config(settings: FederatedRunConfig) -> ModelConfig:
    return student_config(settings.distill, settings.teacher, settings.teacher.norm)


def _coordinator_student(msg: Message, settings: FederatedRunConfig) -> dict[str, torch.Tensor] | None:
    """The students' start the coordinator distilled on public images, if it sent one.

    Untrusted weights: they must be exactly this run's student (same tensor names, shapes and
    dtypes as the student this site builds) with finite values; anything else is refused with
    a one-line reason. They carry no code and are only a starting point: the site fine-tunes
    them on its own images, fits its own operating point, and checks the result before delivery.
    """
    if STUDENT_START_KEY not in msg.content.array_records:
        return None
    state = msg.content.array_records[STUDENT_START_KEY].to_torch_state_dict()
    expected = build_model(_student_config(settings), settings.task.num_classes).state_dict()
    if set(state) != set(expected):
        raise DataError(
            f"the coordinator's student start is not this run's {settings.distill.student} "
            f"({len(state)} tensors, {len(set(state) ^ set(expected))} names differ): refused"
        )
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise DataError(
                f"the coordinator's student start: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"this run's {settings.distill.student} has {tuple(want.shape)} {want.dtype}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DataError(f"the coordinator's student start: {name} has non-finite values: refused")
    return state


def _student_at_site(
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    state: dict[str, torch.Tensor],
    *,
    test: EvalResult | None = None,
) -> AtOperatingPoint:
    """A student's operating point (fitted on the site's validation split) and its test outputs."""
    return score_at_site(
        data,
        settings.task,
        _student_config(settings),
        state,
        site.operating_point,
        compute=site.resolve_compute(),
        test=test,
    )


def _bn_statistics(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    """The moments of every BatchNorm layer's input over this site's un-augmented train split,
    under the model the server sent (run setting ``bn-statistics``, common/batchnorm_stats.py).

    The model is untrusted like any the server sends: it was admitted like a train message
    (policy, pin) and must load into the run's architecture exactly. A site under DP declines:
    these statistics are computed on its training images, and DP-SGD's guarantee covers only
    the noised weights (the gate declines)."""
    gate.enter(BN_STATISTICS)
    role = msg.content["config"].get(BN_MODEL_KEY, "teacher")
    if role not in BN_MODELS:
        raise DataError(
            f"the server asks for BatchNorm statistics of a {role!r} model: expected one of {BN_MODELS}"
        )
    config = settings.teacher if role == "teacher" else _student_config(settings)
    try:
        model = build_loaded_model(config, settings.task, msg.content["arrays"].to_torch_state_dict())
    except RuntimeError as exc:  # load_state_dict: other tensors or shapes than the run's model
        raise DataError(f"the model sent for BatchNorm statistics is not the run's {role}: {exc}") from None
    compute = site.resolve_compute()
    loader = DataLoader(data.dataset("train"), batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory)
    torch.set_num_threads(site.num_threads)
    moments = site_moments(model.to(compute.device), loader, device=compute.device)
    record = ArrayRecord({key: Array(values) for key, values in moments.arrays().items()})
    return RecordDict(
        {BN_STATISTICS_RECORD: record, "metrics": MetricRecord({WEIGHT_KEY: len(data.split.train)})}
    )


def _global_teacher(site: SiteConfig) -> dict[str, torch.Tensor]:
    path = site.out_dir / GLOBAL_TEACHER_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing: this site did not take part in the distillation round, so it cannot "
            "train the federated student"
        )
    return load_model_state(path)


def _kd_teacher(site: SiteConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The teacher the federated-student phases distil from, and the options that go with it.

    The site-adapted teacher (BatchNorm statistics re-estimated at the distillation round) is
    used as is; without one, the global teacher (re-estimated again if the run asks for it).
    """
    adapted = site.out_dir / SITE_BN_TEACHER_FILE
    if adapted.is_file():
        return load_model_state(adapted), {"recalibrate_bn": False}
    return _global_teacher(site), {}


def _save_teacher_logits(site: SiteConfig, logits: torch.Tensor | None) -> None:
    """Keep the global teacher's logits beside it (or drop stale ones of an earlier teacher)."""
    path = site.out_dir / GLOBAL_TEACHER_LOGITS_FILE
    if logits is None:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(path.name + ".partial")
    torch.save(logits, partial)
    partial.replace(path)


def _cached_teacher_logits(site: SiteConfig) -> torch.Tensor | None:
    path = site.out_dir / GLOBAL_TEACHER_LOGITS_FILE
    if not path.is_file():
        return None
    try:
        logits = torch.load(path, weights_only=True)
    except Exception as exc:  # a damaged cache is recomputed, never trusted
        logger.warning("ignoring %s (%s): the teacher's logits are computed again", path, exc)
        return None
    return logits if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None


def _student_round(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    """One round of the federated student: distil from the global student's weights, send them
    back (a deployed site under DP declines: the gate)."""
    gate.enter(FEDERATED_STUDENT)
    server_round = int(msg.content["config"]["server-round"])
    rounds = settings.kd_federated_student_rounds
    if not 1 <= server_round <= rounds:  # the round only places the epoch on the schedule, but check it
        raise DataError(
            f"federated student round {server_round} asked for, but the run has {rounds} such round(s)"
        )
    cached_logits = _cached_teacher_logits(site)
    teacher_state, teacher_options = _kd_teacher(site)
    outcome = _distill_at_site(
        settings,
        site,
        data,
        teacher_state,
        **teacher_options,
        seed=_site_seed(site, settings.distill.seed, "federated-student", server_round, site.name),
        student_state=msg.content["arrays"].to_torch_state_dict(),
        epochs=settings.train.local_epochs,
        evaluate_teacher=False,
        teacher_logits=cached_logits,
        schedule_part=(server_round, rounds),
    )
    if outcome.teacher_logits is not cached_logits:  # none kept yet, or not for this data
        _save_teacher_logits(site, outcome.teacher_logits)
    metrics = {k: v for k, v in outcome.metrics.items() if k.startswith("student_")}
    return RecordDict(
        {
            "arrays": ArrayRecord(outcome.student.state_dict()),
            "metrics": MetricRecord({WEIGHT_KEY: len(data.split.train), **metrics}),
        }
    )


def _student_final(
    msg: Message, settings: FederatedRunConfig, site: SiteConfig, data: SiteData, gate: PrivacyGate
) -> RecordDict:
    """Decide the student this site delivers (the consortium's global student or its fine-tune
    here), fit its operating point, run the check before delivery and export it here."""
    from client.export import EdgeExportOptions, export_site_student

    gate.enter(STUDENT_FINAL)
    state = msg.content["arrays"].to_torch_state_dict()
    config = _student_config(settings)
    teacher_state = _global_teacher(site)
    compute = site.resolve_compute()
    state, delivered, personal_metrics = _personalise(settings, site, data, state)
    student_test = evaluate_state(data, "test", settings.task, config, state, compute=compute)
    teacher_test = evaluate_state(
        data, "test", settings.task, settings.teacher, teacher_state, compute=compute
    )
    metrics = scalar_metrics(student_test, "student_")
    metrics.update(personal_metrics)
    metrics.update(scalar_metrics(teacher_test, "teacher_"))
    student = _student_at_site(settings, site, data, state, test=student_test)
    metrics.update(_check_delivered(settings, site, data, teacher_state, teacher_test, student))
    outcome = DistillOutcome(
        student=build_loaded_model(config, settings.task, state),
        teacher=build_loaded_model(settings.teacher, settings.task, teacher_state),
        metrics=metrics,
    )
    options = EdgeExportOptions(num_threads=site.num_threads)
    exported = export_site_student(
        site,
        settings,
        data,
        outcome,
        metrics,
        teacher_epsilon=gate.teacher_epsilon(),
        options=options,
        subdir="global_student",
        delivered=delivered,
        operating_point=student.point,
    )
    metrics.update(exported)
    return RecordDict({"metrics": MetricRecord({WEIGHT_KEY: len(data.split.test), **metrics})})


def _check_delivered(
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    teacher_state: dict[str, torch.Tensor],
    teacher_test: EvalResult,
    student: AtOperatingPoint,
) -> dict[str, float]:
    """The check before delivery of the federated phase's student against the global teacher
    (its operating point kept at the distillation round), beside the no-KD baseline if it ran."""
    teacher = score_at_site(
        data,
        settings.task,
        settings.teacher,
        teacher_state,
        site.operating_point,
        compute=site.resolve_compute(),
        point=load_teacher_point(site.out_dir, settings.task, site.operating_point),
        test=teacher_test,
    )
    nokd = None
    nokd_path = site.out_dir / NO_KD_STUDENT_FILE
    if settings.kd_no_kd_baseline and nokd_path.is_file():
        nokd = _student_at_site(settings, site, data, load_model_state(nokd_path))
    return check_before_delivery(site.out_dir, site.name, settings.task, teacher, student, nokd=nokd)


def _personalise(
    settings: FederatedRunConfig,
    site: SiteConfig,
    data: SiteData,
    global_state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], DeliveredStudent, dict[str, float]]:
    """The student this site delivers: the federated one, or its local KD fine-tune if that is better.

    The fine-tune (``kd-personalise-epochs``) starts from the global student and distils from
    the global teacher on this site's train split; it is kept only if it beats the global
    student on this site's validation split. Metrics say which one was delivered.
    """
    epochs = settings.distill.personalise_epochs
    if epochs < 1 or len(data.split.val) == 0:
        choice = choose_delivered_student(_val(settings, data, global_state, site), None)
        return global_state, choice, {"student_personalised": 0.0}
    teacher_state, teacher_options = _kd_teacher(site)
    tuned = _distill_at_site(
        settings,
        site,
        data,
        teacher_state,
        **teacher_options,
        seed=_site_seed(site, settings.distill.seed, "personalise", site.name),
        student_state=global_state,
        epochs=epochs,
        evaluate_teacher=False,
    )
    tuned_state = {k: v.detach().cpu() for k, v in tuned.student.state_dict().items()}
    choice = choose_delivered_student(
        _val(settings, data, global_state, site), _val(settings, data, tuned_state, site)
    )
    logger.info("site %s delivers the %s student: %s", site.name, choice.choice, choice.reason)
    personalised = choice.choice == "personalised"
    extra = {
        "student_personalised": float(personalised),
        "personalised_auroc_macro": tuned.metrics.get("student_auroc_macro", float("nan")),
    }
    return (tuned_state if personalised else global_state), choice, extra


def _val(
    settings: FederatedRunConfig, data: SiteData, state: dict[str, torch.Tensor], site: SiteConfig
) -> EvalResult:
    return evaluate_state(
        data, "val", settings.task, _student_config(settings), state, compute=site.resolve_compute()
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _evaluate)


@app.query("bn_statistics")
def bn_statistics(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _bn_statistics)


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _distill)


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    """The run is over: leave a marker in the site's output folder (the site CLI then stops)."""
    site: SiteConfig | None = None
    try:
        settings = run_settings_from_config(site_run_config(context.node_config, context.run_config))
        site = for_run(
            site_from_node_config(context.node_config, settings), context.node_config, context.run_id
        )
        write_json(site.out_dir / RUN_FINISHED_MARKER, {"run_id": context.run_id, "finished_at": time.time()})
    except CxrFlError as exc:
        return _outgoing(msg, context, Error(SITE_BAD_INPUT, str(exc)))
    reply = RecordDict({"metrics": MetricRecord({WEIGHT_KEY: 0})})
    head = None if site is None or site.simulated else site_audit_head(site.state_dir)
    if head is not None:  # the hash alone: the coordinator keeps it as this site's anchor
        reply[AUDIT_RECORD] = ConfigRecord({"head": head})
    return _outgoing(msg, context, reply)


@app.evaluate("model")
def model_evaluation(msg: Message, context: Context) -> Message:
    """An evaluation-only run: score the coordinator's model on this site's test split."""
    return _reply(msg, context, evaluate_model)


@app.query("delivered_student")
def delivered_student_query(msg: Message, context: Context) -> Message:
    """The cross-site matrix: this site's delivered student, if it opted in and is not under DP."""
    return _reply(msg, context, delivered_student)


@app.train("student")
def student_round(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _student_round)


@app.evaluate("student")
def student_final(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _student_final)
