"""The NELBO on oracle denoisers whose exact answer is known."""
import math

import pytest
import torch

from mdlm_plugin.diffusion.objective import (
    any_order_nll, log_probs_without_mask, loss_weights, mask_tokens, nelbo, sample_times,
    subs_log_probs)
from mdlm_plugin.diffusion.schedules import SCHEDULES, build_schedule

V, MASK, PAD = 6, 6, 7          # data symbols 0..5, then <mask>, then a pad id


def independent_oracle(log_p):
    """Positions are i.i.d. with marginal p: the optimal denoiser outputs p."""
    def denoiser(z_t, sigma, positions):
        logits = torch.full((int(positions.sum()), V + 2), -30.0)
        logits[:, :V] = log_p
        logits[:, MASK] = 5.0       # a large mask logit that SUBS must remove
        return logits
    return denoiser


def copy_oracle(z_t, sigma, positions):
    """Data: one token drawn uniformly from V, repeated L times. Exact conditional:
    any revealed token gives the answer; with none revealed, uniform."""
    logits = torch.full(z_t.shape + (V + 2,), -1e4)
    revealed = (z_t != MASK) & (z_t < V)
    any_rev = revealed.any(-1)
    first = torch.where(revealed, z_t, torch.zeros_like(z_t)).max(-1).values
    logits[..., :V] = torch.where(any_rev[:, None, None], -1e4, 0.0)
    rows = torch.arange(z_t.size(0))[any_rev]
    logits[rows, :, first[any_rev]] = 0.0
    return logits[positions]


def test_subs_copies_observed_and_never_predicts_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V + 2)
    logits[..., MASK] = 100.0
    z = torch.tensor([[0, MASK, 3, MASK, 5], [MASK, MASK, 1, 2, MASK]])
    lp = subs_log_probs(logits, z, MASK)
    obs = z != MASK
    assert torch.all(lp[obs].gather(-1, z[obs][:, None]) == 0)           # log-prob 0
    assert torch.all(lp[obs].exp().sum(-1) == 1)                         # one-hot
    assert torch.all(torch.isinf(lp[..., MASK]))                         # mask never predicted
    torch.testing.assert_close(lp[~obs].exp().sum(-1), torch.ones(int((~obs).sum())))
    assert log_probs_without_mask(logits.half(), MASK).dtype == torch.float32


def test_antithetic_times_cover_the_grid():
    g = torch.Generator().manual_seed(3)
    t = sample_times(8, antithetic=True, eps_t=0.0, generator=g)
    frac = torch.sort((t * 8) % 1).values
    torch.testing.assert_close(frac, frac[:1].expand(8), atol=1e-5, rtol=0)  # same offset
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))
    td = sample_times(1000, discrete_steps=10, generator=g)
    assert set(torch.round(td * 10).long().tolist()) == set(range(1, 11))


def test_padding_is_never_masked_or_counted():
    x = torch.tensor([[1, 2, 3, PAD, PAD]] * 4)
    pad = x.eq(PAD)
    z, masked = mask_tokens(x, torch.ones(4), build_schedule("loglinear"), MASK, pad)
    assert not masked[pad].any() and torch.all(z[pad] == PAD)
    terms = nelbo(independent_oracle(torch.zeros(V)), x, build_schedule("loglinear"), MASK, pad)
    assert terms.n_tokens == 12


@pytest.mark.parametrize("name", SCHEDULES)
def test_bound_is_tight_for_independent_oracle(name):
    """E_t[w(t) (1 - alpha_t)] = 1 makes the estimate equal the exact NLL per token."""
    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    x = torch.multinomial(p, 64 * 32, replacement=True).view(64, 32)
    exact = -torch.log(p)[x].mean().item()
    sched = build_schedule(name)
    g = torch.Generator().manual_seed(1)
    est = [nelbo(independent_oracle(p.log()), x, sched, MASK, generator=g) for _ in range(200)]
    per_pass = torch.tensor([e.loss.item() / e.n_tokens for e in est])
    se = per_pass.std().item() / math.sqrt(len(est))
    # boundary terms the bound leaves out (alpha_1 = eps, t >= 1e-3) are O(1e-3)
    assert abs(per_pass.mean().item() - exact) < 4 * se + 2e-3 * exact, (per_pass.mean(), exact, se)


def test_discrete_bound_exceeds_continuous_and_converges():
    """Copy data: exact NLL is log V per sequence. The continuous bound is tight; the
    T-step bound is the right Riemann sum (L/T) sum_k (k/T)^(L-1) log V >= log V."""
    L, B = 8, 256
    sched = build_schedule("loglinear", eps=0.0)
    x = torch.randint(0, V, (B, 1)).expand(B, L).contiguous()
    g = torch.Generator().manual_seed(0)

    def bound(T, passes):
        vals = [nelbo(copy_oracle, x, sched, MASK, discrete_steps=T, eps_t=0.0,
                      generator=g).per_sequence.mean().item() for _ in range(passes)]
        return sum(vals) / passes

    exact = math.log(V)
    cont = bound(0, 200)
    assert abs(cont - exact) < 0.05 * exact
    previous = None
    for T in (2, 4, 16):
        closed_form = L / T * sum((k / T) ** (L - 1) for k in range(1, T + 1)) * exact
        est = bound(T, 200)
        assert abs(est - closed_form) < 0.06 * closed_form, (T, est, closed_form)
        assert closed_form > exact and (previous is None or closed_form < previous)
        previous = closed_form
    assert est > cont


def test_discrete_weight_tends_to_continuous_weight():
    sched = build_schedule("cosine")
    t = torch.tensor([0.3, 0.6, 0.9])
    w_cont = loss_weights(t, sched)
    w_disc = loss_weights(t, sched, discrete_steps=100000)
    torch.testing.assert_close(w_disc, w_cont, rtol=1e-3, atol=0)


def test_any_order_nll_is_exact_for_the_copy_oracle():
    """Any order: the first revealed token costs log V, the rest are free."""
    x = torch.randint(0, V, (5, 1)).expand(5, 7).contiguous()
    nll = any_order_nll(copy_oracle, x, build_schedule("loglinear"), MASK,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nll, torch.full((5,), math.log(V)), rtol=1e-4, atol=1e-4)
