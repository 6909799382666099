"""What a site's replies may say about its data: every number coarse, nothing that names a file.

A coordinator needs a loss, the macro AUROC and rough example counts to aggregate (FedAvg weights)
and to pick a model. But it also chooses the model a site scores: with a crafted model (one that
predicts a constant, known distribution) a loss at full float precision is a linear function of
the site's class shares, and accuracy, balanced accuracy, macro F1 and per-class figures give
them directly. Timings times throughput give the size of the training split. So, by default, a
deployed site:

- sends no class-revealing metric (all but the macro AUROC and the losses; per-class figures are
  named ``<metric>/<class>``);
- rounds every other number to two significant digits (:func:`coarse`): what a coordinator can
  solve for from a crafted model is then no finer than that rounding; example counts are rounded
  the same way, in steps of at least 10 (:func:`bucket_count`);
- under DP, sends nothing computed on the training split besides the noised weights: no
  training loss, no timings or throughput, no noise multiplier (it follows from the split's
  size); the epsilon spent, coarse, stays;
- sends error texts without file or folder names, with every integer replaced by ``#`` and
  every other number coarse (:func:`public_text`); the site's own log keeps the full text.

The scalars of the check before delivery (:data:`DELIVERY_CHECK_SCALARS`, client/site_operating_point.py:
balanced accuracy at the site's operating points, the number of classes the delivered student
never chooses, the verdict) leave a deployed site coarse without an opt-in, as the coordinator's
summary needs them: a balanced accuracy is a mean of within-class rates, so no class share follows
from it, even for a crafted model; they reveal at most how many classes the test split holds. Their
per-class figures (``..._op_sensitivity/<class>``) are per-class figures like any other.
The same holds for the scalars of an evaluation-only run (:data:`EVALUATION_SCALARS`,
client/model_evaluation.py): balanced accuracy at the site's operating point with its interval
and the mean sensitivity and specificity over the classes are means of within-class rates, sent
coarse; the macro AUROC and its interval are sent like any macro AUROC; their per-class figures
(``eval_auroc/<class>``, ``eval_op_sensitivity/<class>``...) only with the opt-in.

Opt-ins, the site's own options (node_config, never a run setting): ``share-per-class-metrics``
(``cxr-fl-client start --share-per-class-metrics``) adds the class-revealing metrics, still
coarse; ``share-exact-metrics`` sends every figure and error text at full precision, under DP
the training-split figures too (research federations whose sites agree to it). Simulated sites
are the coordinator's own partitions and share everything, exactly, for the simulation's
reports. Paths never leave any site.

:class:`Disclosure` is the one place that shapes what leaves: the ClientApp passes every reply's
records (through the site's privacy gate, client/privacy_gate.py) and every error text through it
(client/app.py ``_outgoing``). The opt-ins are part of the site's privacy policy
(client/site_privacy.py ``site_disclosure``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from common.metrics import PER_CLASS_NAMES, SCALAR_NAMES
from common.protocol import WEIGHT_KEY, scrub_paths

CLASS_REVEALING = tuple(name for name in SCALAR_NAMES if name != "auroc_macro")
"""Scalar metrics that, with a crafted model, give class shares (all but the macro AUROC)."""

TRAINING_SPLIT_KEYS = frozenset(
    {"loss", "train_seconds", "images_per_s", "dp_noise_multiplier", "distill_seconds"}
)
"""Figures computed on the training split (besides the weights): never sent by a DP site."""

DELIVERY_CHECK_SCALARS = frozenset(
    {
        "teacher_op_balanced_accuracy",
        "student_op_balanced_accuracy",
        "nokd_op_balanced_accuracy",
        "kd_op_balanced_accuracy",
        "student_op_never_predicted",
        "delivery_check_ok",
    }
)
"""The check before delivery's scalars: sent coarse by every site (see the module docstring)."""

EVALUATION_SCALARS = frozenset(
    {
        "eval_op_balanced_accuracy",
        "eval_op_balanced_accuracy_low",
        "eval_op_balanced_accuracy_high",
        "eval_op_sensitivity_mean",
        "eval_op_specificity_mean",
    }
)
"""An evaluation-only run's means of within-class rates: sent coarse by every site."""

SIGNIFICANT_DIGITS = 2

_NUMBER = re.compile(r"(?<![\w.-])[-+]?(\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?![\w])")


def coarse(value: float) -> float:
    """``value`` rounded to two significant digits (NaN and infinities as they are)."""
    if not math.isfinite(value) or value == 0:
        return float(value)
    return float(f"{value:.{SIGNIFICANT_DIGITS - 1}e}")


def bucket_count(n: int) -> int:
    """``n`` rounded to two significant digits, in steps of at least 10 (0 stays 0).

    7 -> 10, 57 -> 60, 123 -> 120, 1234 -> 1200: FedAvg weights stay within about 5% of the
    exact ones for sites of 100 images or more (within 50% below that).
    """
    if n <= 0:
        return 0
    step = max(10, 10 ** (int(math.log10(n)) - 1))
    return max(step, round(n / step) * step)


def _reveals_classes(key: str) -> bool:
    if key in DELIVERY_CHECK_SCALARS or key in EVALUATION_SCALARS:
        return False
    if "/" in key:  # per-class figures are named '<metric>/<class>'
        return True
    return any(key == name or key.endswith("_" + name) for name in (*CLASS_REVEALING, *PER_CLASS_NAMES))


def _coarse_number(match: re.Match[str]) -> str:
    text = match.group(0)
    if re.fullmatch(r"[-+]?\d+", text):
        return "#"  # an integer may be a count: none leaves
    return f"{coarse(float(text)):g}"


@dataclass(frozen=True)
class Disclosure:
    """What one site's replies may carry (see the module docstring)."""

    per_class: bool = False
    exact: bool = False

    def metrics(self, metrics: Mapping[str, float | int], *, dp: bool = False) -> dict[str, float | int]:
        """The metrics a reply may carry; ``dp``: the site trains under DP in this run."""
        out = dict(metrics)
        if dp and not self.exact:
            out = {k: v for k, v in out.items() if k not in TRAINING_SPLIT_KEYS}
        if not self.per_class:
            out = {k: v for k, v in out.items() if not _reveals_classes(k)}
        if self.exact:
            return out
        return {k: bucket_count(int(v)) if k == WEIGHT_KEY else _coarse_value(v) for k, v in out.items()}

    def text(self, text: str) -> str:
        """An error text as it may leave: never paths; numbers coarse unless ``exact``."""
        text = scrub_paths(text)
        return text if self.exact else _NUMBER.sub(_coarse_number, text)


def _coarse_value(value: float | int) -> float | int:
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) <= 1):
        return value
    return coarse(float(value))
