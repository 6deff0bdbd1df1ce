"""Several tasks: TaskWeighting (fixed and bounded uncertainty weighting) against hand and numpy
computations, and TaskHeads (one head per task)."""

import numpy as np
import pytest
import torch

from lightning_ft.heads import LinearHead, TaskHeads, TemporalHead
from lightning_ft.losses.multitask import TaskWeighting, fixed_weighted, uncertainty_weighted


def _np_uncertainty(losses, raw, present, bound):
    """Value and gradients (d/draw, d/dL) of sum_present 0.5 exp(-s) L + 0.5 s, s = bound tanh(raw / bound)."""
    s = bound * np.tanh(raw / bound)
    ds_draw = 1 - np.tanh(raw / bound) ** 2
    value = np.sum(present * (0.5 * np.exp(-s) * losses + 0.5 * s))
    d_raw = present * 0.5 * (1 - np.exp(-s) * losses) * ds_draw
    d_loss = present * 0.5 * np.exp(-s)
    return value, d_raw, d_loss


def test_uncertainty_weighting_value_and_gradients_match_numpy():
    losses_np = np.array([2.3, 0.4, 1.1, 0.05])
    raw_np = np.array([0.7, -1.9, 4.5, 0.0])
    present_np = np.array([True, True, False, True])
    losses = torch.tensor(losses_np, requires_grad=True)
    raw = torch.tensor(raw_np, requires_grad=True)
    total = uncertainty_weighted(losses, raw, torch.tensor(present_np), bound=2.5)
    total.backward()
    value, d_raw, d_loss = _np_uncertainty(losses_np, raw_np, present_np, 2.5)
    assert float(total.detach()) == pytest.approx(value, rel=1e-12)
    assert np.allclose(raw.grad.numpy(), d_raw, rtol=1e-12, atol=1e-15)
    assert np.allclose(losses.grad.numpy(), d_loss, rtol=1e-12, atol=1e-15)
    # s = 0: the loss weighs one half
    assert float(uncertainty_weighted(torch.tensor([3.0]), torch.zeros(1))) == pytest.approx(1.5)


def test_an_absent_task_adds_nothing_and_gets_no_gradient_even_with_a_nan_loss():
    losses = torch.tensor([1.2, float("nan")], requires_grad=True)  # the mean over an empty batch
    raw = torch.tensor([0.3, -0.8], requires_grad=True)
    total = uncertainty_weighted(losses, raw, torch.tensor([True, False]))
    total.backward()
    s = 3.0 * np.tanh(0.3 / 3.0)
    assert float(total.detach()) == pytest.approx(0.5 * np.exp(-s) * 1.2 + 0.5 * s, rel=1e-6)
    assert raw.grad[1] == 0 and losses.grad[1] == 0
    assert raw.grad[0] != 0 and torch.isfinite(raw.grad).all() and torch.isfinite(losses.grad).all()


def test_bounded_log_variances_stay_bounded_where_the_unbounded_form_runs_away():
    losses, bound, k = torch.tensor([1e-8, 1e-8]), 3.0, 2  # tasks the model has solved

    def bounded(raw):
        return uncertainty_weighted(losses, raw, bound=bound)

    def unbounded(s):  # the form of the reference implementation: sum exp(-s) L + s
        return (torch.exp(-s) * losses + s).sum()

    # both optimised by Adam for 2000 steps, in one loop (the two sums share nothing)
    params = torch.zeros(2 * k, requires_grad=True)
    optimiser = torch.optim.Adam([params], lr=0.05)
    for _ in range(2000):
        optimiser.zero_grad()
        (bounded(params[:k]) + unbounded(params[k:])).backward()
        optimiser.step()
    raw, s_free = params.detach()[:k], params.detach()[k:]

    s = bound * torch.tanh(raw / bound)
    assert (s.abs() < bound).all() and (s < -2.9).all()  # pushed to the bound, not past it
    assert float(bounded(raw)) > -k * bound / 2
    assert (s_free < -3 * bound).all()  # heading for log(1e-8) = -18.4, and -inf as L -> 0
    assert float(unbounded(s_free)) < -3 * k * bound


def test_fixed_weighting_by_hand():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert float(fixed_weighted(losses, torch.tensor([0.5, 1.0, 0.25]))) == pytest.approx(3.5)
    assert float(fixed_weighted(losses, torch.tensor([0.5, 1.0, 0.25]), torch.tensor([True, False, True]))) == 1.5

    weighting = TaskWeighting(["crop", "water", "urban"], weights={"crop": 0.5, "urban": 0.25})
    assert list(weighting.parameters()) == []
    assert weighting.weights_dict() == {"crop": 0.5, "water": 1.0, "urban": 0.25}
    all_losses = {"crop": losses[0], "water": losses[1], "urban": losses[2]}
    total = weighting(all_losses, present={"water": torch.tensor(False)})
    assert float(total) == pytest.approx(1.5)
    # a task left out of losses has no label in the batch: absent
    assert float(weighting({"crop": losses[0], "urban": losses[2]})) == pytest.approx(1.5)


def test_uncertainty_module_learns_one_raw_log_variance_per_task():
    weighting = TaskWeighting(["a", "b"], mode="uncertainty", bound=2.0)
    assert [tuple(p.shape) for p in weighting.parameters()] == [(2,)]
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([10.0, -1.0]))
    s = weighting.effective_log_vars().detach()
    assert torch.allclose(s, 2.0 * torch.tanh(torch.tensor([10.0, -1.0]) / 2.0)) and s[0] < 2.0
    weights = weighting.weights_dict()
    assert weights["a"] == pytest.approx(0.5 * np.exp(-float(s[0]))) and weights["b"] == pytest.approx(
        0.5 * np.exp(-float(s[1]))
    )
    la, lb = torch.tensor(0.7), torch.tensor(1.3)
    expected = uncertainty_weighted(torch.stack([la, lb]), weighting.log_vars, bound=2.0)
    assert torch.allclose(weighting({"a": la, "b": lb}), expected)
    total = weighting({"a": la, "b": lb}, present={"b": torch.tensor(False)})
    total.backward()
    assert weighting.log_vars.grad[1] == 0 and weighting.log_vars.grad[0] != 0


def test_task_weighting_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['cropp'\].*Tasks: crop, water"):
        TaskWeighting(["crop", "water"], weights={"cropp": 2.0})
    with pytest.raises(ValueError, match="must be >= 0"):
        TaskWeighting(["crop", "water"], weights={"crop": -1.0})
    with pytest.raises(ValueError, match="learns its weights"):
        TaskWeighting(["crop"], mode="uncertainty", weights={"crop": 1.0})
    with pytest.raises(ValueError, match="bound must be > 0"):
        TaskWeighting(["crop"], mode="uncertainty", bound=0.0)
    weighting = TaskWeighting(["crop", "water"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['wter'\]"):
        weighting({"crop": torch.tensor(1.0), "wter": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"no loss"):
        weighting({})
    with pytest.raises(ValueError, match=r"present says task\(s\) \['water'\] have labels"):
        weighting({"crop": torch.tensor(1.0)}, present={"water": True})
    with pytest.raises(ValueError, match="reduce it to a scalar"):
        weighting({"crop": torch.ones(3)})
    with pytest.raises(RuntimeError, match="no log-variances"):
        weighting.effective_log_vars()


def test_task_heads_give_one_logit_tensor_per_task():
    heads = TaskHeads(16, {"crop": 7, "irrigated": 2})
    out = heads(torch.randn(4, 16))
    assert set(out) == {"crop", "irrigated"} and out["crop"].shape == (4, 7) and out["irrigated"].shape == (4, 2)
    assert isinstance(heads.heads["crop"], LinearHead) and not heads.wants_dates
    assert heads.heads["crop"] is not heads.heads["irrigated"]
    assert {n.split(".")[1] for n, _ in heads.named_parameters()} == {"crop", "irrigated"}


def test_task_heads_pass_dates_to_temporal_heads():
    heads = TaskHeads(8, {"crop": 3, "season": 4}, head="temporal", head_kwargs={"pooling": "mean"})
    assert heads.wants_dates and isinstance(heads.heads["season"], TemporalHead)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = heads(torch.randn(2, 5, 8), mask, torch.arange(1, 6).expand(2, 5))
    assert out["crop"].shape == (2, 3) and out["season"].shape == (2, 4)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({}, "non-empty dict"),
        ({"val/crop": 3}, "without '/' or '.'"),
        ({"a.b": 3}, "without '/' or '.'"),
        ({"": 3}, "non-empty strings"),
        ({"crop": 1}, "int >= 2"),
        ({"crop": 2.5}, "int >= 2"),
        ({"crop": True}, "int >= 2"),
        ({"type": 3}, "attribute of nn.ModuleDict.*'type_'"),
    ],
)
def test_task_heads_refuse_bad_tasks(tasks, message):
    with pytest.raises(ValueError, match=message):
        TaskHeads(8, tasks)
