"""A deployed site's own bound on the work a coordinator may ask of it.

Run settings come from the coordinator; how much of a hospital's machine one run may take is
the site's decision. ``cxr-fl-client start`` options (node config keys without the dashes):

- ``--max-image-size`` (256): the largest image side, in pixels, the site decodes and trains on;
- ``--max-local-epochs`` (10): local epochs per message (teacher rounds, federated-student rounds);
- ``--max-kd-epochs`` (20): KD epochs per message (``kd-epochs``, ``kd-personalise-epochs``);
- ``--max-rounds`` (100): rounds per run (``num-rounds``, ``kd-federated-student-rounds``), and
  messages of each kind the site accepts in one run, whatever the coordinator says they are;
- ``--max-teacher-parameters`` (60,000,000): the size of the teacher (and of the student) the
  run builds, counted on PyTorch's meta device (no memory, no weights);
- ``--phases`` (``teacher,distill,federated-student``): the phases of a run the site takes part
  in; a run whose settings include another phase (``kd-enabled``, ``kd-federated-student-rounds``)
  is declined at its first message.

The defaults sit above everything the README and the benchmarks run (224 px, 5 local epochs,
6 KD epochs, 10 rounds, the 43.5 M-parameter ResNet50 V2 + VGG19 teacher). A request beyond the
policy is declined (SitePolicyError, an error reply with SITE_DECLINED and the reason) before
the site loads its data or builds a cache. No run setting can change the policy. Simulated
sites (Flower's simulation runtime) are the coordinator's own partitions: no policy applies.

The policy itself (:class:`~common.site_limits.SitePolicy`) and its file (``--policy FILE``, the
site policy an onboarding kit proposes) live in common/site_limits.py; this module checks runs
against it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from common.config import ModelConfig
from common.errors import CxrFlError
from common.protocol import (
    DISTILL_MESSAGE_TYPE,
    EVALUATE_MODEL_MESSAGE_TYPE,
    STUDENT_FINAL_MESSAGE_TYPE,
    STUDENT_ROUND_MESSAGE_TYPE,
)
from common.run_settings import FederatedRunConfig
from common.site_limits import SitePolicy

KD_KINDS = (DISTILL_MESSAGE_TYPE, STUDENT_ROUND_MESSAGE_TYPE, STUDENT_FINAL_MESSAGE_TYPE)
"""Message types of the distillation phases."""


class SitePolicyError(CxrFlError):
    """The coordinator asks for more than this site's policy allows: the site declines."""


def check_request(
    policy: SitePolicy, settings: FederatedRunConfig, kind: str, config: Mapping[str, Any]
) -> None:
    """Decline (SitePolicyError) a message whose run asks for more than ``policy``.

    Checked on every message before any work: the run's settings (all of them, so that a run
    beyond the policy is declined at its first message, not after its teacher rounds), the
    round numbers the message itself carries, and the size of the models the run builds. An
    evaluation-only run's message trains nothing: only its image size, the models' sizes and the
    site's evaluation phase count.
    """
    evaluation = kind == EVALUATE_MODEL_MESSAGE_TYPE  # trains nothing: image size, model sizes, phase
    kd = settings.kd_enabled or kind in KD_KINDS or evaluation
    asked = [
        ("image-size", settings.run.image_size, policy.max_image_size, "max-image-size", "px images"),
        (
            "local-epochs",
            settings.train.local_epochs,
            policy.max_local_epochs,
            "max-local-epochs",
            "local epochs",
        ),
        ("num-rounds", settings.run.num_rounds, policy.max_rounds, "max-rounds", "rounds per run"),
        ("num-rounds", _int(config, "num-rounds"), policy.max_rounds, "max-rounds", "rounds per run"),
        ("server-round", _int(config, "server-round"), policy.max_rounds, "max-rounds", "rounds per run"),
    ]
    if evaluation:
        asked = asked[:1]
    elif kd:
        asked += [
            ("kd-epochs", settings.distill.epochs, policy.max_kd_epochs, "max-kd-epochs", "KD epochs"),
            (
                "kd-personalise-epochs",
                settings.distill.personalise_epochs,
                policy.max_kd_epochs,
                "max-kd-epochs",
                "KD epochs",
            ),
            (
                "kd-federated-student-rounds",
                settings.kd_federated_student_rounds,
                policy.max_rounds,
                "max-rounds",
                "federated-student rounds per run",
            ),
        ]
    for setting, value, limit, option, unit in asked:
        if value > limit:
            raise SitePolicyError(
                f"the run asks for {setting} = {value}, but this site's policy allows at most {limit} "
                f"{unit} (--{option}): declined before any work"
            )
    _check_model_sizes(policy, settings, kd)
    _check_phases(policy, settings, kind)


def run_phases(settings: FederatedRunConfig, kind: str) -> list[str]:
    """The phases a run asks of a site (its settings), and the phase of the message ``kind``;
    an evaluation-only run's message asks for the evaluation phase alone (it trains nothing)."""
    if kind == EVALUATE_MODEL_MESSAGE_TYPE:
        return ["evaluation"]
    needed = ["teacher"]
    if settings.kd_enabled or kind == DISTILL_MESSAGE_TYPE:
        needed.append("distill")
    if (settings.kd_enabled and settings.kd_federated_student_rounds > 0) or kind in KD_KINDS[1:]:
        needed.append("federated-student")
    return needed


def _check_phases(policy: SitePolicy, settings: FederatedRunConfig, kind: str) -> None:
    refused = [phase for phase in run_phases(settings, kind) if phase not in policy.phases]
    if refused:
        raise SitePolicyError(
            f"the run has a {refused[0]} phase, but this site's policy takes part only in "
            f"{', '.join(policy.phases)} (--phases): declined before any work"
        )


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SitePolicyError(f"the message's '{key}' is {value!r}, not a number: declined")
    return int(value)


def _check_model_sizes(policy: SitePolicy, settings: FederatedRunConfig, kd: bool) -> None:
    from dataclasses import replace

    from common.local import student_config

    models = [("teacher", replace(settings.teacher, weights=None))]
    if kd:
        student = student_config(settings.distill, settings.teacher, settings.teacher.norm)
        models.append(("student", replace(student, weights=None)))
    for role, config in models:
        size = model_parameters(config, settings.task.num_classes)
        if size > policy.max_teacher_parameters:
            raise SitePolicyError(
                f"the run's {role} '{config.name}' has {size:,} parameters, but this site's policy allows "
                f"at most {policy.max_teacher_parameters:,} (--max-teacher-parameters): declined before "
                "any work"
            )


@functools.lru_cache(maxsize=16)
def model_parameters(config: ModelConfig, num_outputs: int) -> int:
    """Parameters of the model ``config`` builds, counted on the meta device (no memory used;
    kept for the process: a warm site answers many messages of one run)."""
    import torch

    from common.models import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(config, num_outputs))


def check_message_count(policy: SitePolicy, kind: str, accepted: int, run_id: int) -> None:
    """Decline a message beyond ``--max-rounds`` messages of its kind in one run."""
    if accepted > policy.max_rounds:
        raise SitePolicyError(
            f"run {run_id} has sent this site {accepted} '{kind}' messages, but this site's policy "
            f"allows at most {policy.max_rounds} rounds per run (--max-rounds): declined"
        )
