"""Typed, frozen configuration for models, data, training, distillation, privacy and aggregation.

Each dataclass validates itself on construction and raises :class:`~common.errors.ConfigError`
naming the field, the bad value and what is allowed. The app layer (server/, client/,
simulation/) builds these from Flower's run_config / node_config with
:func:`common.run_settings.from_mapping`, which understands the kebab-case keys of
``[tool.flwr.app.config]`` (``local-epochs`` -> ``local_epochs``), optionally under a prefix
(``kd-temperature`` -> ``DistillConfig.temperature``). Code below the app layer only ever sees
these dataclasses.

Defaults: ``[tool.flwr.app.config]`` in pyproject.toml is the one place a run setting's default is
decided; a field's default here is that same value (tests/test_settings_defaults.py), so a
dataclass built without a key behaves like a run that never set it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from common.errors import ConfigError, UnknownNameError
from common.tasks import get_task

Norm = Literal["batch", "group"]
Optimizer = Literal["sgd", "adam", "adamw"]
Accountant = Literal["rdp", "prv", "gdp"]
MixMode = Literal["none", "mixup", "cutmix"]
Schedule = Literal["cosine", "constant"]
SelectMetric = Literal["auroc", "fidelity"]
LocalLoss = Literal["ce", "balanced-softmax", "fedlc", "fedrs"]

OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
MIX_MODES: tuple[str, ...] = get_args(MixMode)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
SELECT_METRICS: tuple[str, ...] = get_args(SelectMetric)
LOCAL_LOSSES: tuple[str, ...] = get_args(LocalLoss)
STRATEGY_NAMES: tuple[str, ...] = ("fedadam", "fedavg", "fedmedian", "fedprox", "fedyogi", "krum")
"""The ``strategy`` run setting's values: the names of server/strategies.py's registry (a test
checks that they agree), known here so that every party checks a run's settings alike."""


SITE_DP_OPTIONS: tuple[str, ...] = (
    "dp-target-epsilon",
    "dp-target-delta",
    "dp-max-grad-norm",
    "dp-accountant",
)
"""A site's own DP options: its node config keys (``cxr-fl-client start --epsilon``, ``--delta``,
``--max-grad-norm``, ``--accountant``; ``dp-target-epsilon`` in its policy file)."""
_SITE_DP_ALLOWED = {
    "dp-target-epsilon": "a finite number > 0 (this site's privacy budget)",
    "dp-target-delta": "a number strictly between 0 and 1 (at most 1e-5 is usual)",
    "dp-max-grad-norm": "a finite number > 0",
}


def check_site_dp_option(key: str, value: object, option: str) -> float | str:
    """One of a site's own DP options (:data:`SITE_DP_OPTIONS`), checked; ConfigError naming
    ``option`` (``--epsilon``, ``node_config 'dp-target-epsilon'``, the policy file's key).

    The one check of a site's DP options, wherever they come from: its command line, its node
    config, its policy file. Stricter than a run's request (:class:`PrivacyConfig`): a site's
    budget and clipping norm are finite.
    """
    if key == "dp-accountant":
        if value not in ACCOUNTANTS:
            raise ConfigError(option, value, "one of " + ", ".join(ACCOUNTANTS))
        return str(value)
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    ok = 0 < number < 1 if key == "dp-target-delta" else math.isfinite(number) and number > 0
    if not ok:
        raise ConfigError(option, value, _SITE_DP_ALLOWED[key])
    return number


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(option, value, "one of " + ", ".join(choices))


def _check_positive(option: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(option, value, "a number >= 0" if allow_zero else "a number > 0")


def _check_fraction(option: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        lo = "(0" if open_low else "[0"
        hi = "1)" if open_high else "1]"
        raise ConfigError(option, value, f"a number in {lo}, {hi}")


@dataclass(frozen=True)
class TaskConfig:
    """Which task the federation solves; the name must be a registered task."""

    name: str = "normal-pneumonia-covid"

    def __post_init__(self) -> None:
        get_task(self.name)  # raises UnknownNameError listing the known tasks


@dataclass(frozen=True)
class ModelConfig:
    """A network to build: registered name, normalisation, optional local weights file.

    ``norm`` is fixed up front for the whole federation: ``group`` for runs where any site
    uses DP-SGD (Opacus cannot compute per-sample gradients through BatchNorm, whose output
    for one image depends on the rest of the batch), ``batch`` otherwise.
    """

    name: str = "resnet18"
    norm: Norm = "batch"
    weights: Path | None = None
    in_channels: int = 1
    width_mult: float = 1.0
    dropout: float = 0.2

    def __post_init__(self) -> None:
        # Imported here, not at the top, only because the models import torch (seconds): the
        # command lines check settings without it. The models never import this module
        # (build_model reads a ModelRecipe, which this class is; tests/test_import_graph.py).
        from common.models import MODELS, NORMS

        MODELS.get(self.name)
        _check_choice("norm", self.norm, NORMS)
        if self.in_channels not in (1, 3):
            raise ConfigError("in-channels", self.in_channels, "1 (greyscale) or 3 (RGB)")
        _check_positive("width-mult", self.width_mult)
        _check_fraction("dropout", self.dropout, open_high=True)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError("weights", str(self.weights), "a path to an existing weights file")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings for one site (or the pooled baseline)."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0
    seed: int = 0
    num_threads: int = 1
    # freeze the first N blocks of the teacher's backbone (common/freeze.py); -1: train the head only
    freeze_blocks: int = 0
    # the teacher's local loss under label skew (common/label_skew.py); single-label tasks, no DP
    local_loss: LocalLoss = "ce"

    def __post_init__(self) -> None:
        _check_choice("local-loss", self.local_loss, LOCAL_LOSSES)
        if self.freeze_blocks < -1:
            raise ConfigError(
                "freeze-blocks", self.freeze_blocks, "an integer >= 0, or -1 to train only the head"
            )
        if self.local_epochs < 1:
            raise ConfigError("local-epochs", self.local_epochs, "an integer >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch-size", self.batch_size, "an integer >= 1")
        _check_positive("lr", self.lr)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_fraction("momentum", self.momentum, open_high=True)
        _check_positive("weight-decay", self.weight_decay, allow_zero=True)
        _check_positive("proximal-mu", self.proximal_mu, allow_zero=True)
        if self.num_threads < 1:
            raise ConfigError("num-threads", self.num_threads, "an integer >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """Hinton knowledge distillation of a student from a teacher.

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
    """

    student: str = "mobilenetv2"
    width_mult: float = 1.0
    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    # False: the teacher runs live on exactly the (augmented, mixed) view the student trains on;
    # True: faster, its logits of the un-augmented images are computed once and reused
    cache_teacher_logits: bool = False
    seed: int = 0
    # re-estimate a BatchNorm teacher's running statistics on the site's train images before KD
    recalibrate_bn: bool = True
    # batch mixing before both models see a batch: none | mixup | cutmix (live teacher only)
    mix: MixMode = "none"
    mix_alpha: float = 0.2
    # learning rate: linear warm-up over this many epochs, then cosine decay (or constant)
    warmup_epochs: int = 1
    schedule: Schedule = "cosine"
    # keep the student of the epoch with the best validation score (macro-AUROC, else loss);
    # stop after this many epochs without improvement (0: run every epoch)
    select_best: bool = True
    patience: int = 0
    # what "best" means: "auroc" (validation macro-AUROC, else minus the loss) or "fidelity"
    # (closest to the teacher's outputs on the validation images: no labels needed, and every
    # image counts, not only the few of a rare class); a student without a teacher uses "auroc"
    select_metric: SelectMetric = "auroc"
    # after a federated student: fine-tune it locally by KD for this many epochs and deliver the
    # fine-tuned student only if it beats the global one on the site's validation split (0: never)
    personalise_epochs: int = 0
    # the coordinator distils the student's start from the teacher on these public images (a
    # manifest CSV at the coordinator; "" = each site starts from random weights), for this many
    # epochs (common/public_distillation.py)
    public_manifest: str = ""
    public_epochs: int = 4
    # its batch size and learning rate (0: kd-batch-size, kd-lr): thousands of public images over
    # many epochs allow larger batches than a site's few hundred, and larger batches train faster
    public_batch_size: int = 0
    public_lr: float = 0.0

    def __post_init__(self) -> None:
        from common.models import MODELS  # lazy for the same reason as in ModelConfig

        MODELS.get(self.student)
        _check_positive("kd-width-mult", self.width_mult)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError("kd-temperature", self.temperature, "a finite number > 0")
        _check_fraction("kd-alpha", self.alpha)
        if self.epochs < 1:
            raise ConfigError("kd-epochs", self.epochs, "an integer >= 1")
        if self.batch_size < 1:
            raise ConfigError("kd-batch-size", self.batch_size, "an integer >= 1")
        _check_positive("kd-lr", self.lr)
        _check_choice("kd-optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("kd-mix", self.mix, MIX_MODES)
        if not (self.mix_alpha > 0 and math.isfinite(self.mix_alpha)):
            raise ConfigError("kd-mix-alpha", self.mix_alpha, "a finite number > 0 (e.g. 0.2 to 1)")
        if self.mix != "none" and self.cache_teacher_logits:
            raise ConfigError(
                "kd-mix",
                self.mix,
                "none when kd-cache-teacher-logits = true (cached logits are of un-mixed images); "
                "or set kd-cache-teacher-logits = false",
            )
        if self.warmup_epochs < 0:
            raise ConfigError("kd-warmup-epochs", self.warmup_epochs, "an integer >= 0")
        _check_choice("kd-schedule", self.schedule, SCHEDULES)
        _check_choice("kd-select-metric", self.select_metric, SELECT_METRICS)
        if self.patience < 0:
            raise ConfigError("kd-patience", self.patience, "an integer >= 0 (0: no early stopping)")
        if self.personalise_epochs < 0:
            raise ConfigError("kd-personalise-epochs", self.personalise_epochs, "an integer >= 0 (0: off)")
        if self.public_epochs < 1:
            raise ConfigError("kd-public-epochs", self.public_epochs, "an integer >= 1")
        if self.public_batch_size < 0:
            raise ConfigError(
                "kd-public-batch-size", self.public_batch_size, "an integer >= 1, or 0 for kd-batch-size"
            )
        if not (self.public_lr >= 0 and math.isfinite(self.public_lr)):
            raise ConfigError("kd-public-lr", self.public_lr, "a finite number > 0, or 0 for kd-lr")
        if self.public_manifest and not Path(self.public_manifest).is_absolute():
            raise ConfigError(
                "kd-public-manifest",
                self.public_manifest,
                'an absolute path to a manifest CSV on the coordinator\'s machine, or ""',
            )


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings (Opacus). A site may tighten, never loosen, what the server requests."""

    enabled: bool = False
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = "rdp"
    # Per-sample gradients take memory in proportion to the images of one forward/backward pass
    # (about 3 GB for ResNet18 at 32 images): a larger logical batch (batch-size) is split into
    # physical batches of at most this many images, summed before one noisy step.
    max_physical_batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.max_physical_batch_size, bool) or self.max_physical_batch_size < 1:
            raise ConfigError("dp-max-physical-batch-size", self.max_physical_batch_size, "an integer >= 1")
        _check_positive("dp-target-epsilon", self.target_epsilon)
        _check_fraction("dp-target-delta", self.target_delta, open_low=True, open_high=True)
        _check_positive("dp-max-grad-norm", self.max_grad_norm)
        _check_choice("dp-accountant", self.accountant, ACCOUNTANTS)

    def tightened_by(self, site: PrivacyConfig | None) -> PrivacyConfig:
        """The stricter of this (requested) policy and a site's own policy.

        DP is on if either side wants it; epsilon, delta, the clipping norm and the physical
        batch cap are each the smaller of the two. The accountant is the site's when it sets one.
        """
        if site is None or not site.enabled:
            return self
        if not self.enabled:
            return site
        return PrivacyConfig(
            enabled=True,
            target_epsilon=min(self.target_epsilon, site.target_epsilon),
            target_delta=min(self.target_delta, site.target_delta),
            max_grad_norm=min(self.max_grad_norm, site.max_grad_norm),
            accountant=site.accountant,
            max_physical_batch_size=min(self.max_physical_batch_size, site.max_physical_batch_size),
        )


@dataclass(frozen=True)
class StrategySettings:
    """What the coordinator chooses about aggregation and site sampling (server/strategies.py)."""

    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_sites: int = 2
    min_evaluate_sites: int = 2
    min_available_sites: int = 2
    proximal_mu: float = 0.0
    server_lr: float = 0.1
    krum_malicious: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise UnknownNameError("strategy", self.strategy, STRATEGY_NAMES)
        for option, value in (
            ("fraction-train", self.fraction_train),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            if not 0.0 < value <= 1.0:
                raise ConfigError(option, value, "a number in (0, 1]")
        for option, count in (
            ("min-train-sites", self.min_train_sites),
            ("min-evaluate-sites", self.min_evaluate_sites),
            ("min-available-sites", self.min_available_sites),
        ):
            if count < 1:
                raise ConfigError(option, count, "an integer >= 1")
        if self.min_available_sites < max(self.min_train_sites, self.min_evaluate_sites):
            raise ConfigError(
                "min-available-sites",
                self.min_available_sites,
                f"at least min-train-sites ({self.min_train_sites}) and "
                f"min-evaluate-sites ({self.min_evaluate_sites})",
            )
        if self.proximal_mu < 0:
            raise ConfigError("proximal-mu", self.proximal_mu, "a number >= 0")
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            raise ConfigError("proximal-mu", self.proximal_mu, "a number > 0 with strategy 'fedprox'")
        if self.server_lr <= 0:
            raise ConfigError("server-lr", self.server_lr, "a number > 0")
        if self.krum_malicious < 0:
            raise ConfigError("krum-malicious", self.krum_malicious, "an integer >= 0")


@dataclass(frozen=True)
class CentralDPSettings:
    """Run settings ``central-dp-*`` (server/central_dp.py): off while the noise multiplier is 0."""

    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                "central-dp-noise-multiplier", self.noise_multiplier, "a finite number >= 0 (0: off)"
            )
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ConfigError("central-dp-clipping-norm", self.clipping_norm, "a finite number > 0")
        if not 0 < self.delta < 1:
            raise ConfigError("central-dp-delta", self.delta, "a number strictly between 0 and 1")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0
