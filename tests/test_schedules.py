"""Noise schedules: derivatives against autograd, boundary values, positive weights."""
import pytest
import torch

from mdlm_plugin.diffusion.schedules import SCHEDULES, build_schedule


@pytest.mark.parametrize("name", SCHEDULES)
def test_dsigma_matches_autograd(name):
    s = build_schedule(name)
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(s.sigma(t).sum(), t)
    torch.testing.assert_close(s.dsigma(t.detach()), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_boundaries_and_monotone(name):
    s = build_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = s.alpha(t)
    assert alpha[0] > 0.99          # almost nothing masked at t = 0
    assert alpha[-1] < 0.01         # almost everything masked at t = 1
    assert torch.all(alpha[1:] < alpha[:-1])  # strictly decreasing
    torch.testing.assert_close(s.mask_prob(t), 1 - alpha)


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    s = build_schedule(name)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (dalpha,) = torch.autograd.grad(s.alpha(t).sum(), t)
    w = s.weight(t.detach())
    assert torch.all(w > 0)
    torch.testing.assert_close(w, -dalpha / (1 - s.alpha(t.detach())), rtol=1e-9, atol=1e-9)


def test_loglinear_weight_is_one_over_t():
    s = build_schedule("loglinear", eps=0.0)
    t = torch.tensor([0.01, 0.25, 0.5, 0.99], dtype=torch.float64)
    torch.testing.assert_close(s.weight(t), 1 / t)
    torch.testing.assert_close(build_schedule("loglinear").mask_prob(t), (1 - 1e-3) * t)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosyne'.*loglinear"):
        build_schedule("cosyne")
