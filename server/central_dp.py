"""Central DP, the second privacy mode: Flower's ``DifferentialPrivacyClientSideFixedClipping``.

With ``central-dp-noise-multiplier = z > 0`` every site clips its round update (its trained
teacher minus the global teacher it received) to L2 norm ``central-dp-clipping-norm = C``
(flower_adapter/central_dp.py, Flower's own clipping function), and the server adds Gaussian noise of
standard deviation ``z * C / n`` to the FedAvg average of the ``n`` updates (Flower's wrapper,
with ``n = min-train-sites``: with more sites the noise is larger than needed, never smaller).

**What it guarantees, and to whom.** Each released global teacher is then a Gaussian mechanism
of noise multiplier ``z`` on the sites' clipped updates, so the sequence of global teachers is
(epsilon, delta)-DP with respect to *a whole site's data* (site-level DP), for anyone who sees
only global teachers: the other sites, users of the final model, whoever gets a checkpoint.
Epsilon is accounted with Opacus' RDP analysis (sampling rate 1: every site takes part each
round, no amplification) and logged every round. It does **not** protect against the
coordinator, which sees each site's clipped update before adding noise, and it relies on the
coordinator adding the noise at all. DP-SGD at the sites (``dp-enabled``) is the mode that
holds against the coordinator, per training image, under each site's own budget; the two can
be combined. Flower's own ``RdpAccountant`` is not used: it needs the ``dp-accounting`` package
and equal FedAvg weights (our sites are weighted by their image counts).

The settings (:class:`common.config.CentralDPSettings`) and their rules (FedAvg, a GroupNorm
teacher: :func:`common.run_settings.check_central_dp`) are read and checked with every run
setting, so every entry point refuses the same runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from common.config import CentralDPSettings
from common.run_settings import check_central_dp as check_central_dp  # re-exported: the rule lives there

logger = logging.getLogger(__name__)


def site_level_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian releases of noise multiplier ``noise_multiplier`` (RDP)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    if releases == 0:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=orders)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)


class CentralDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper, plus the per-round epsilon and the wrapped
    strategy's attributes (``min_available_nodes`` ...) for the round loop."""

    def __init__(self, strategy: FedAvg, settings: CentralDPSettings, num_sampled_sites: int) -> None:
        super().__init__(strategy, settings.noise_multiplier, settings.clipping_norm, num_sampled_sites)
        self.delta = settings.delta
        self.releases = 0

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def epsilon(self) -> float:
        return site_level_epsilon(self.noise_multiplier, self.releases, self.delta)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
            epsilon = self.epsilon()
            logger.info(
                "central DP: round %d released with noise multiplier %.3g, clipping %.3g; site-level "
                "epsilon %.3f at delta %g after %d release(s)",
                server_round,
                self.noise_multiplier,
                self.clipping_norm,
                epsilon,
                self.delta,
                self.releases,
            )
            if metrics is not None:
                metrics["central_dp_epsilon"] = epsilon
        return arrays, metrics


def with_central_dp(strategy: FedAvg, settings: CentralDPSettings, min_train_sites: int) -> FedAvg:
    """``strategy`` wrapped for central DP when it is on, else unchanged."""
    if not settings.enabled:
        return strategy
    return CentralDP(strategy, settings, min_train_sites)  # type: ignore[return-value]
