"""A site's part in central DP (server/central_dp.py): clip its round update before it leaves.

When a train message's config carries Flower's clipping key (``clipping_norm``, set by
``DifferentialPrivacyClientSideFixedClipping``), the site scales its update (trained weights
minus the global weights it received) down to that L2 norm with Flower's own
``compute_clip_model_update`` and sends global + clipped update. The server then adds the
noise; see server/central_dp.py for what that guarantees and to whom.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from common.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["KEY_CLIPPING_NORM", "clip_update"]


def clip_update(
    global_state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], clipping_norm: object
) -> dict[str, torch.Tensor]:
    """``trained`` with its update relative to ``global_state`` clipped to L2 norm ``clipping_norm``."""
    if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, int | float):
        raise ConfigError(KEY_CLIPPING_NORM, clipping_norm, "a number > 0 (central DP clipping norm)")
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ConfigError(KEY_CLIPPING_NORM, clipping_norm, "a finite number > 0 (central DP clipping norm)")
    keys = list(global_state)
    if set(keys) != set(trained):
        raise ConfigError(
            "global model", sorted(set(keys) ^ set(trained)), "the same tensors as the trained model"
        )
    new = [trained[k].detach().cpu().numpy().copy() for k in keys]
    old = [global_state[k].detach().cpu().numpy() for k in keys]
    norm = float(
        np.sqrt(sum(float(np.sum((n.astype(np.float64) - o) ** 2)) for n, o in zip(new, old, strict=True)))
    )
    compute_clip_model_update(param1=new, param2=old, clipping_norm=float(clipping_norm))
    logger.info("central DP: update of L2 norm %.4g clipped to %.4g", norm, clipping_norm)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, new, strict=True)}
