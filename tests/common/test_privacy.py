"""DP-SGD planning, budget accounting across rounds, and the Opacus wrapper."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.config import ModelConfig, PrivacyConfig, TrainConfig
from common.errors import ConfigError, PrivacyError
from common.models import build_model
from common.privacy import (
    BudgetExhaustedError,
    check_budget_for_round,
    epsilon_of,
    make_private,
    plan_dp,
    projected_history,
    unwrap_model,
)
from common.tasks import Task, get_task
from common.training import make_optimizer, train_one_epoch

POLICY = PrivacyConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)


def test_plan_spends_the_whole_budget_over_the_planned_rounds() -> None:
    plan = plan_dp(POLICY, num_examples=200, batch_size=20, local_epochs=2, num_rounds=4)

    assert plan.sample_rate == pytest.approx(0.1)
    assert plan.steps_per_round == 20
    history = projected_history([], plan, rounds=4)
    spent = epsilon_of(history, plan)
    # Opacus bisects sigma until epsilon is within 0.01 below the target.
    assert POLICY.target_epsilon - 0.05 <= spent <= POLICY.target_epsilon


def test_epsilon_grows_each_round_and_the_round_past_the_budget_is_declined() -> None:
    plan = plan_dp(POLICY, num_examples=100, batch_size=25, local_epochs=1, num_rounds=3)
    history: list[tuple[float, float, int]] = []
    spent = []
    for _ in range(3):
        projected = check_budget_for_round(history, plan)
        history = projected_history(history, plan)
        spent.append(epsilon_of(history, plan))
        assert projected == pytest.approx(spent[-1])

    assert spent[0] < spent[1] < spent[2] <= POLICY.target_epsilon
    with pytest.raises(BudgetExhaustedError, match="declines"):
        check_budget_for_round(history, plan)


def test_an_unreachable_budget_is_refused_with_the_numbers() -> None:
    tiny = PrivacyConfig(enabled=True, target_epsilon=1e-4, target_delta=1e-5)
    with pytest.raises(PrivacyError, match="cannot be reached"):
        plan_dp(tiny, num_examples=10, batch_size=10, local_epochs=50, num_rounds=50)


def test_batchnorm_model_is_refused_with_the_reason() -> None:
    model = build_model(ModelConfig(name="tiny-cnn", norm="batch"), 2)
    plan = plan_dp(POLICY, num_examples=16, batch_size=8, local_epochs=1, num_rounds=1)
    loader = DataLoader(TensorDataset(torch.zeros(16, 1, 32, 32), torch.zeros(16, 2)), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match="norm='group'"):
        make_private(model, optimizer, loader, plan, [], dp_seed=0)


def _group_norm_model_and_loader(images: int, batch_size: int) -> tuple[Task, torch.nn.Module, DataLoader]:
    """A GroupNorm tiny CNN and a loader of random two-class images."""
    task = get_task("normal-pneumonia")
    model = build_model(ModelConfig(name="tiny-cnn", norm="group"), task.num_classes)
    labels = torch.nn.functional.one_hot(torch.arange(images) % 2, 2).float()
    loader = DataLoader(TensorDataset(torch.randn(images, 1, 32, 32), labels), batch_size=batch_size)
    return task, model, loader


def test_private_training_continues_the_accountant_and_unwraps() -> None:
    task, model, loader = _group_norm_model_and_loader(32, batch_size=8)
    plan = plan_dp(POLICY, num_examples=32, batch_size=8, local_epochs=1, num_rounds=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    first = make_private(model, make_optimizer(model, TrainConfig(lr=0.05)), loader, plan, [], dp_seed=1)
    train_one_epoch(first.model, first.loader, task, first.optimizer)
    after_one = first.epsilon()
    # Each round starts from a fresh model holding the (unwrapped) weights, as a site does.
    second_model = build_model(ModelConfig(name="tiny-cnn", norm="group"), task.num_classes)
    second_model.load_state_dict(unwrap_model(first.model).state_dict())
    second = make_private(
        second_model,
        make_optimizer(second_model, TrainConfig(lr=0.05)),
        loader,
        plan,
        first.history(),
        dp_seed=2,
    )
    train_one_epoch(second.model, second.loader, task, second.optimizer)

    assert 0 < after_one < second.epsilon() <= POLICY.target_epsilon
    state = unwrap_model(second.model).state_dict()
    assert set(state) == set(before)
    assert not any(k.startswith("_module.") for k in state)
    assert any(not torch.equal(state[k], before[k]) for k in before)


def test_a_plan_made_for_another_policy_is_refused() -> None:
    from common.privacy import check_plan_matches

    plan = plan_dp(POLICY, num_examples=100, batch_size=25, local_epochs=1, num_rounds=3)
    check_plan_matches(plan, POLICY)
    tighter = PrivacyConfig(enabled=True, target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="policy changed"):
        check_plan_matches(plan, tighter)


def test_large_logical_batches_run_in_small_physical_batches_with_one_noisy_step_each() -> None:
    task, model, loader = _group_norm_model_and_loader(64, batch_size=16)
    plan = plan_dp(POLICY, num_examples=64, batch_size=16, local_epochs=1, num_rounds=1)
    private = make_private(
        model,
        make_optimizer(model, TrainConfig(lr=0.05)),
        loader,
        plan,
        [],
        dp_seed=3,
        max_physical_batch_size=4,
    )
    forward_sizes: list[int] = []
    unwrap_model(private.model).register_forward_hook(lambda _m, args, _o: forward_sizes.append(len(args[0])))
    noisy_steps = 0
    original_step = private.optimizer.original_optimizer.step  # type: ignore[attr-defined]

    def counting_step(*args: object, **kwargs: object) -> object:
        nonlocal noisy_steps
        noisy_steps += 1
        return original_step(*args, **kwargs)

    private.optimizer.original_optimizer.step = counting_step  # type: ignore[attr-defined]

    with private.physical_batches() as physical:
        train_one_epoch(private.model, physical, task, private.optimizer)

    assert max(forward_sizes, default=0) <= 4
    assert sum(forward_sizes) > 16  # more than one logical batch's worth was seen
    # Poisson sampling gives 4 logical batches per epoch; each becomes one noisy optimizer step
    # and one accountant entry, however many physical batches it was split into.
    assert noisy_steps == plan.steps_per_round == 4
    assert private.history() == [(plan.noise_multiplier, plan.sample_rate, 4)]
    assert 0 < private.epsilon() <= POLICY.target_epsilon


def test_the_physical_batch_cap_is_checked_and_a_site_may_lower_it() -> None:
    with pytest.raises(ConfigError, match="dp-max-physical-batch-size"):
        PrivacyConfig(enabled=True, max_physical_batch_size=0)
    server = PrivacyConfig(enabled=True, max_physical_batch_size=32)
    site = PrivacyConfig(enabled=True, max_physical_batch_size=8)
    assert server.tightened_by(site).max_physical_batch_size == 8


def test_a_round_with_other_steps_or_sampling_than_the_plan_is_declined() -> None:
    from common.privacy import PlanMismatchError, check_round_matches_plan

    plan = plan_dp(POLICY, num_examples=200, batch_size=20, local_epochs=2, num_rounds=4)

    check_round_matches_plan(plan, num_examples=200, batch_size=20, local_epochs=2)
    for changed in (
        {"num_examples": 200, "batch_size": 20, "local_epochs": 10},  # more steps
        {"num_examples": 200, "batch_size": 40, "local_epochs": 4},  # same images seen, other sampling
        {"num_examples": 400, "batch_size": 20, "local_epochs": 1},  # same steps, other split
    ):
        with pytest.raises(PlanMismatchError, match="differs from this site's DP plan"):
            check_round_matches_plan(plan, **changed)
    assert issubclass(PlanMismatchError, BudgetExhaustedError)  # declined, not a site error
