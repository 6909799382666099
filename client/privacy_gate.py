"""The one gate every phase of a site passes for its privacy: :class:`PrivacyGate`.

The ClientApp (client/app.py) builds one gate per message, once the message is admitted
(client/admission.py) and the site's data is loaded, and hands it to the phase's handler. The
gate holds the privacy the run gets at this site (the site's policy, client/site_privacy.py,
which a request can only tighten) and decides, in one place:

- whether a phase may run at all (:meth:`PrivacyGate.enter`, the first call of every handler):
  a site under DP declines the federated-student rounds (their weights are trained on its
  images without DP) and BatchNorm statistics of its training images, and sends its delivered
  student to the cross-site matrix only with its opt-in and never under DP;
- the DP plan and budget of a teacher round (:meth:`PrivacyGate.teacher_round`): the site's
  ledger entry, opened before anything trains (an unverifiable ledger declines, fail closed),
  and what the round spent, recorded after it; weights of a round that went over the budget
  never leave (:meth:`DPRound.spend`);
- the epsilon a model card reports (:meth:`PrivacyGate.teacher_epsilon`);
- what a reply may carry (:meth:`PrivacyGate.reply_metrics`, client/disclosure.py): coarse
  figures, class-revealing ones only with the site's opt-in, nothing computed on the training
  split under DP.

A decline raises :class:`~client.site_policy.SitePolicyError` or
:class:`~common.privacy.BudgetExhaustedError`; the ClientApp turns either into an error reply
(SITE_DECLINED) with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client.privacy_ledger import LedgerEntry, LedgerIntegrityError, PrivacyLedger, open_site_ledger
from client.site_audit import record_site_event
from client.site_policy import SitePolicyError
from common.config import PrivacyConfig
from common.privacy import AccountantHistory, BudgetExhaustedError, DPPlan
from common.run_settings import FederatedRunConfig

if TYPE_CHECKING:
    from client.site import SiteConfig
    from common.local import SiteData

logger = logging.getLogger(__name__)

TEACHER_ROUND = "teacher-round"
VALIDATION = "validation"
DISTILLATION = "distillation"
FEDERATED_STUDENT = "federated-student"
STUDENT_FINAL = "student-final"
BN_STATISTICS = "bn-statistics"
EVALUATION = "evaluation"
CROSS_SITE_STUDENT = "cross-site-student"
PHASES = (
    TEACHER_ROUND,
    VALIDATION,
    DISTILLATION,
    FEDERATED_STUDENT,
    STUDENT_FINAL,
    BN_STATISTICS,
    EVALUATION,
    CROSS_SITE_STUDENT,
)
"""The phases a site's handlers run; each passes :meth:`PrivacyGate.enter` first."""


@dataclass
class DPRound:
    """One DP teacher round's budget: the site's ledger entry (plan, history) before it trains."""

    site: SiteConfig
    privacy: PrivacyConfig
    ledger: PrivacyLedger
    entry: LedgerEntry
    run_id: int

    @property
    def plan(self) -> DPPlan | None:
        return self.entry.plan

    @property
    def history(self) -> AccountantHistory:
        return self.entry.history

    def spend(self, plan: DPPlan | None, history: AccountantHistory, server_round: int) -> None:
        """Write what the round actually spent (from the accountant's history) to the site's
        ledger and audit trail; BudgetExhaustedError when it went over the target: its weights
        stay at the site and the site declines further training rounds."""
        entry = self.entry
        entry.plan, entry.history = plan, history
        entry.spent.append(
            {"run_id": self.run_id, "round": server_round, "epsilon": entry.epsilon, "at": time.time()}
        )
        self.ledger.save()
        if not self.site.simulated:
            record_site_event(
                self.site.state_dir, "dp-spent", run_id=self.run_id, round=server_round, epsilon=entry.epsilon
            )
        if entry.epsilon > self.privacy.target_epsilon + 1e-9:  # never send what went over budget
            raise BudgetExhaustedError(
                f"this round spent epsilon {entry.epsilon:.3f} > target {self.privacy.target_epsilon}; "
                "its weights stay at the site and the site declines further training rounds"
            )


class PrivacyGate:
    """A site's privacy decisions for one message of a run (see the module docstring)."""

    def __init__(self, site: SiteConfig, settings: FederatedRunConfig, data: SiteData, run_id: int) -> None:
        self.site = site
        self.data = data
        self.run_id = run_id
        self.privacy = site.effective_privacy(settings.privacy, len(data.split.train))

    @property
    def under_dp(self) -> bool:
        """The site trains under DP in this run (its own budget, or the run's request)."""
        return self.privacy.enabled

    def enter(self, phase: str) -> None:
        """Decline ``phase`` when the site's privacy forbids it (every handler's first call)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}: expected one of {PHASES}")
        if phase == FEDERATED_STUDENT and self.under_dp and not self.site.simulated:
            # (a simulated partition is the coordinator's own data: studies may still combine the two)
            raise BudgetExhaustedError(
                "a federated-student round sends weights trained on this site's images without DP, which "
                "no privacy budget covers: a site under DP declines it (its own student is still exported)"
            )
        if phase == BN_STATISTICS and self.under_dp:
            raise SitePolicyError(
                "a site under DP does not send BatchNorm statistics of its training images: DP-SGD's "
                "guarantee covers only its noised weights"
            )
        if phase == CROSS_SITE_STUDENT:
            self._check_send_student()

    def _check_send_student(self) -> None:
        if not self.site.privacy.share_delivered_student:
            raise SitePolicyError(
                "this site keeps its delivered student (no --share-delivered-student): not in the "
                "cross-site matrix"
            )
        if self.under_dp:
            raise SitePolicyError("a site under DP never sends its student (distilled without DP): declined")

    def teacher_round(self) -> DPRound | None:
        """The DP budget of a teacher round (None without DP), from the site's ledger: fail
        closed, an unverifiable ledger raises (LedgerIntegrityError) before anything trains."""
        if not self.under_dp:
            return None
        ledger, entry = open_site_ledger(self.site, self.data)
        return DPRound(self.site, self.privacy, ledger, entry, self.run_id)

    def teacher_epsilon(self) -> float | None:
        """The epsilon the site's ledger records for its data, for a model card (None without DP
        or when unverifiable: reporting only, this spends no budget)."""
        if not self.under_dp:
            return None
        try:
            return open_site_ledger(self.site, self.data)[1].epsilon
        except LedgerIntegrityError as exc:
            logger.warning("teacher epsilon unknown: %s", exc)
            return None

    def reply_metrics(self, metrics: Mapping[str, float | int]) -> dict[str, float | int]:
        """The metrics a reply may carry (client/disclosure.py, with this run's DP)."""
        return self.site.privacy.disclosure.metrics(metrics, dp=self.under_dp)
