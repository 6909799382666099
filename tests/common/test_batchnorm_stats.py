"""Federated BatchNorm statistics (common/batchnorm_stats.py): exact per-site moments whose
pooled combination is the one-pass statistics of the union, and the checks of a site's reply."""

from __future__ import annotations

from copy import deepcopy as copy_module

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.batchnorm_stats import (
    MEAN_SQ_SUFFIX,
    MEAN_SUFFIX,
    expected_channels,
    moments_problem,
    pooled_statistics,
    positions_per_image,
    site_moments,
    with_statistics,
)


def _net() -> nn.Module:
    """Conv-BN-ReLU twice (channels x spatial), then a BatchNorm1d on pooled features."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(6),
        nn.Linear(6, 3),
    )
    for module in net.modules():  # statistics far from the data's, as after FedAvg
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.fill_(0.7)
            module.running_var.fill_(3.0)
    return net


def _sites() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [  # uneven sizes and different image statistics (label skew shows in the pixels)
        torch.randn(n, 1, 8, 8, generator=generator) * scale + shift
        for n, scale, shift in ((5, 1.0, 0.0), (17, 2.0, 1.5), (9, 0.5, -1.0))
    ]


def _reference(net: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm layer's input over ``batches``, torch's own way: a copy of the net whose
    BatchNorm layers normalise with batch statistics (train mode, no running buffers), then
    torch's mean and unbiased variance per channel over every image and position."""
    copy = copy_module(net)
    copy.eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in copy.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
            module.register_forward_pre_hook(
                lambda _m, args, name=name: inputs.setdefault(name, []).append(args[0])
            )
    with torch.no_grad():
        for batch in batches:
            copy(batch)
    out = {}
    for name, parts in inputs.items():
        x = torch.cat(parts).double()
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # channels x (images * positions)
        out[name] = (flat.mean(dim=1), flat.var(dim=1, unbiased=True))
    return out


def test_pooled_site_moments_equal_one_pass_over_the_union() -> None:
    # Prepare
    net, sites = _net(), _sites()
    positions = positions_per_image(net, in_channels=1, image_size=8)

    # Execute: each site over its own images in batches of 3, then the server's combination
    moments = [site_moments(net, DataLoader(TensorDataset(x), batch_size=3)) for x in sites]
    pooled = pooled_statistics([(m.images, m.arrays()) for m in moments], positions)

    # Assert: torch's one pass over the union, in the same batches
    assert positions == {"1": 64, "4": 16, "8": 1}
    assert [m.images for m in moments] == [5, 17, 9]
    reference = _reference(net, [batch for x in sites for batch in x.split(3)])
    assert set(pooled) == set(reference)
    for name, (mean, var) in reference.items():
        np.testing.assert_allclose(pooled[name][0], mean.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(pooled[name][1], var.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
    # the first layer's input depends on no normalisation: plain statistics of the union
    union = nn.Sequential(*list(net)[:1])(torch.cat(sites)).detach().double().transpose(0, 1).reshape(4, -1)
    np.testing.assert_allclose(pooled["1"][1], union.var(dim=1).numpy(), rtol=1e-6)


def test_site_moments_leave_the_model_and_its_mode_as_they_were() -> None:
    net = _net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    site_moments(net, DataLoader(TensorDataset(_sites()[0]), batch_size=2))

    assert net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_statistics_are_written_into_running_buffers_only() -> None:
    net = _net()
    state = net.state_dict()
    stats = {
        "1": (np.arange(4.0), np.full(4, 2.0)),
        "4": (np.zeros(6), np.ones(6)),
        "8": (np.ones(6), np.ones(6)),
    }

    updated = with_statistics(state, stats)

    assert torch.equal(updated["1.running_mean"], torch.arange(4.0))
    assert updated["1.running_var"].dtype == state["1.running_var"].dtype
    assert torch.equal(updated["1.num_batches_tracked"], state["1.num_batches_tracked"])
    assert torch.equal(updated["0.weight"], state["0.weight"])
    net.load_state_dict(updated)


def _good_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    return site_moments(net, DataLoader(TensorDataset(_sites()[1]), batch_size=8)).arrays()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda a: a.__setitem__(f"1{MEAN_SUFFIX}", np.array([np.nan, 0, 0, 0])), "non-finite"),
        (lambda a: a.__setitem__(f"4{MEAN_SQ_SUFFIX}", np.full(6, np.inf)), "non-finite"),
        (lambda a: a.__setitem__(f"8{MEAN_SQ_SUFFIX}", a[f"8{MEAN_SUFFIX}"] ** 2 - 1.0), "negative variance"),
        (lambda a: a.__setitem__(f"1{MEAN_SUFFIX}", np.zeros(5)), "shape"),
        (lambda a: a.__setitem__(f"1{MEAN_SUFFIX}", np.zeros(4, dtype=np.int64)), "floating point"),
        (lambda a: a.pop(f"4{MEAN_SUFFIX}"), "missing"),
        (lambda a: a.__setitem__("extra.input_mean", np.zeros(2)), "extra"),
    ],
)
def test_a_damaged_reply_is_named_and_a_good_one_passes(damage: object, why: str) -> None:
    net = _net()
    channels = expected_channels(net)
    arrays = _good_arrays(net)
    assert moments_problem(arrays, channels) is None

    damage(arrays)  # type: ignore[operator]

    problem = moments_problem(arrays, channels)
    assert problem is not None
    assert why in problem
