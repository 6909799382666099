"""Differential privacy for a site's local training: Opacus DP-SGD under a budget the site sets.

A site's budget (target epsilon and delta) covers the *whole planned run*, not one round. So the
noise multiplier is derived once from the plan (rounds x local epochs x steps per epoch at the
site's sampling rate) and then kept; the accountant's history (a few tuples) persists between
rounds at the site, and before every round the site projects the epsilon it would have spent
after that round. If the projection exceeds the target, the round is declined instead of
exceeding the budget (:class:`BudgetExhaustedError`).

Opacus computes per-sample gradients, which BatchNorm makes meaningless (one image's output
depends on the rest of the batch): DP runs use models built with ``norm="group"``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.config import PrivacyConfig
from common.errors import PrivacyError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus is imported inside the functions that use it: it takes seconds to import, and every
# Flower message starts a fresh ClientApp process, so runs without DP should not pay for it.

AccountantHistory = list[tuple[float, float, int]]


class BudgetExhaustedError(PrivacyError):
    """Another round would take the site past its privacy budget."""


class PlanMismatchError(BudgetExhaustedError):
    """The round as requested (steps, sampling rate) is not the one the site's budget planned."""


@dataclass(frozen=True)
class DPPlan:
    """The noise and sampling a site uses for every round of a run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DPPlan:
        return cls(**json.loads(text))


def check_model_is_private_compatible(model: nn.Module) -> None:
    """Raise PrivacyError naming the layers Opacus cannot handle (BatchNorm above all)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors[:3])
        raise PrivacyError(
            "this model cannot be trained with DP-SGD: "
            f"{details}. BatchNorm mixes the images of a batch, so per-sample gradients (and "
            "with them the privacy guarantee) do not exist. Build every party's model with "
            "norm='group' (run setting 'norm = \"group\"') when any site uses DP."
        )


def plan_dp(
    policy: PrivacyConfig,
    *,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
) -> DPPlan:
    """Derive the noise multiplier that spends exactly the target epsilon over the planned run.

    With Poisson sampling Opacus draws each batch with sampling rate ``1 / batches_per_epoch``
    and takes ``batches_per_epoch`` steps per epoch; the plan uses the same figures.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not policy.enabled:
        raise ValueError("plan_dp called with DP disabled")
    if num_examples < 1:
        raise PrivacyError("a site with no training images cannot take part in a DP run")
    if num_rounds < 1:
        raise PrivacyError(f"the planned number of rounds must be >= 1 (got {num_rounds})")
    batches_per_epoch = max(1, math.ceil(num_examples / batch_size))
    sample_rate = 1.0 / batches_per_epoch
    steps_per_round = local_epochs * batches_per_epoch
    total_steps = steps_per_round * num_rounds
    try:
        sigma = get_noise_multiplier(
            target_epsilon=policy.target_epsilon,
            target_delta=policy.target_delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=policy.accountant,
        )
    except ValueError as exc:
        raise PrivacyError(
            f"DP target epsilon={policy.target_epsilon}, delta={policy.target_delta} cannot be "
            f"reached in {num_rounds} rounds x {local_epochs} local epochs at sampling rate "
            f"{sample_rate:.4f} ({num_examples} images, batch {batch_size}): {exc}. Raise the "
            "epsilon, or plan fewer rounds or local epochs, or use a smaller batch."
        ) from None
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=num_rounds,
        target_epsilon=policy.target_epsilon,
        target_delta=policy.target_delta,
        max_grad_norm=policy.max_grad_norm,
        accountant=policy.accountant,
    )


def check_plan_matches(plan: DPPlan, policy: PrivacyConfig) -> None:
    """Refuse to go on under a plan made for another policy (e.g. a site that tightened its budget).

    The noise of the rounds already trained was chosen for the plan's target; honouring a new
    target would need a new run.
    """
    planned = (plan.target_epsilon, plan.target_delta, plan.max_grad_norm, plan.accountant)
    wanted = (policy.target_epsilon, policy.target_delta, policy.max_grad_norm, policy.accountant)
    if planned != wanted:
        raise PrivacyError(
            "the privacy policy changed since this run's DP plan was made: planned epsilon, delta, "
            f"clipping, accountant = {planned}, now {wanted}. The rounds already trained used noise "
            "chosen for the old target; start a new run (new run folder) under the new policy"
        )


def check_round_matches_plan(plan: DPPlan, *, num_examples: int, batch_size: int, local_epochs: int) -> None:
    """Refuse a round whose steps or sampling rate differ from the plan's.

    The noise multiplier was chosen for the plan's steps per round and sampling rate; a server
    that raises ``local-epochs`` or changes ``batch-size`` (or the split, hence the number of
    training images) would make the site spend more than it budgeted.
    """
    batches_per_epoch = max(1, math.ceil(num_examples / batch_size))
    steps = local_epochs * batches_per_epoch
    sample_rate = 1.0 / batches_per_epoch
    if steps != plan.steps_per_round or not math.isclose(sample_rate, plan.sample_rate, rel_tol=1e-9):
        raise PlanMismatchError(
            f"the round as requested ({local_epochs} local epochs, batch {batch_size} on "
            f"{num_examples} training images: {steps} steps at sampling rate {sample_rate:.4f}) "
            f"differs from this site's DP plan ({plan.steps_per_round} steps per round at sampling "
            f"rate {plan.sample_rate:.4f}); its privacy cost was not budgeted, so the site declines "
            "the round. Run it with the settings the plan was made for."
        )


def epsilon_of(history: AccountantHistory, plan: DPPlan) -> float:
    """Epsilon spent by an accountant ``history`` at the plan's delta (0 for no steps)."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    accountant = create_accountant(plan.accountant)
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta=plan.target_delta))


def projected_history(history: AccountantHistory, plan: DPPlan, rounds: int = 1) -> AccountantHistory:
    """The history after ``rounds`` more rounds of the plan."""
    extra = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * rounds)
    return [*history, extra]


def check_budget_for_round(history: AccountantHistory, plan: DPPlan) -> float:
    """Epsilon the site would have spent after one more round; raise if over its target."""
    after = epsilon_of(projected_history(history, plan), plan)
    # Opacus finds sigma by bisection to within 0.01 epsilon of the target.
    if after > plan.target_epsilon + 1e-9:
        spent = epsilon_of(history, plan)
        raise BudgetExhaustedError(
            f"privacy budget spent: epsilon so far {spent:.3f}; another round would reach "
            f"{after:.3f} > target {plan.target_epsilon} (delta {plan.target_delta}). The site "
            "declines further training rounds."
        )
    return after


@dataclass
class PrivateTraining:
    """A model, optimizer and loader wrapped by Opacus for one round of DP-SGD."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    plan: DPPlan
    max_physical_batch_size: int = 16

    @contextmanager
    def physical_batches(self) -> Iterator[DataLoader]:
        """The loader in batches of at most ``max_physical_batch_size`` images.

        Opacus' BatchMemoryManager splits each (Poisson-sampled) logical batch; the optimizer
        clips every image's gradient, sums them and takes one noisy step per logical batch, so
        the privacy accounting is that of the logical batch.
        """
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        with BatchMemoryManager(
            data_loader=self.loader,
            max_physical_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,  # type: ignore[arg-type]
        ) as loader:
            yield loader

    def history(self) -> AccountantHistory:
        return [tuple(h) for h in self.engine.accountant.history]  # type: ignore[misc]

    def epsilon(self) -> float:
        return epsilon_of(self.history(), self.plan)


def dp_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator for DP-SGD's noise or Poisson sampling.

    ``seed=None`` (a deployed site) seeds it with 64 bits of the operating system's entropy
    (:mod:`secrets`), drawn afresh for every round and never stored or sent: the coordinator, which
    knows every run setting, the round and the site's name, cannot regenerate the noise and
    subtract it from the weights. Only a simulation passes a seed, to repeat its runs exactly.
    (Opacus' own ``secure_mode`` needs torchcsprng, which does not support this torch.)
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(64) if seed is None else seed)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: DPPlan,
    history: AccountantHistory,
    *,
    dp_seed: int | None,
    max_physical_batch_size: int = 16,
) -> PrivateTraining:
    """Wrap for DP-SGD with the plan's noise, continuing the accountant from ``history``.

    The noise and the Poisson sampling of the batches draw from :func:`dp_generator`:
    ``dp_seed=None`` takes both from the OS's entropy (every deployed site), a seed makes them
    repeatable (simulations only). Train on :meth:`PrivateTraining.physical_batches` to bound
    memory for large batches.
    """
    from opacus import PrivacyEngine

    check_model_is_private_compatible(model)
    engine = PrivacyEngine(accountant=plan.accountant)
    # Opacus draws the noise on each parameter's device with this generator: they must match.
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    noise = dp_generator(device, dp_seed)
    # Opacus' Poisson sampler takes the loader's generator
    loader.generator = dp_generator("cpu", None if dp_seed is None else dp_seed + 1)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise,
    )
    engine.accountant.history = [tuple(h) for h in history]
    logger.info(
        "DP-SGD: noise multiplier %.4f, clipping %.3g, sampling rate %.4f, epsilon so far %.3f",
        plan.noise_multiplier,
        plan.max_grad_norm,
        plan.sample_rate,
        epsilon_of(history, plan),
    )
    return PrivateTraining(
        private_model, private_optimizer, private_loader, engine, plan, max_physical_batch_size
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus GradSampleModule (its ``_module``), or the model itself."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model
