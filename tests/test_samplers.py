"""Tests of mdlm_plugin.diffusion.samplers against denoisers with known answers."""
import math

import pytest
import torch

from mdlm_plugin.diffusion.samplers import (
    SampleResult, SamplerConfig, denoise_probs, inverse_cdf, sample, sample_semi_ar,
    unigram_entropy, _transition,
)
from mdlm_plugin.diffusion.schedules import build_schedule

V = 6            # tokens 0..4 are real, 5 is <mask>
MASK = 5
L = 8
# Chi-square threshold for 8 positions x 4 degrees of freedom = 32 dof: mean 32,
# sd 8; 80 is six standard deviations out (p < 1e-6), far below a wrong sampler.
CHI2_MAX = 80.0


def marginals():
    """Distinct, known marginals per position (zero on <mask>)."""
    base = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    p = torch.stack([base.roll(i) for i in range(L)])
    return torch.cat([p, torch.zeros(L, 1, dtype=torch.float64)], 1)


class Oracle:
    """Independent positions: logits log p[l] at position l, whatever the input.

    The <mask> logit is large, so a sampler that forgot to exclude it would keep
    masks. Checks the denoiser convention: asked exactly about masked positions."""

    def __init__(self, probs):
        logits = probs.log().float()
        logits[:, MASK] = 10.0
        self.logits = logits
        self.calls = 0
        self.sigmas = []

    def __call__(self, z, sigma, positions):
        assert positions.dtype == torch.bool and positions.shape == z.shape
        assert torch.equal(positions, z == MASK)
        assert sigma.shape == (z.size(0),)
        self.calls += 1
        self.sigmas.append(sigma.clone())
        return self.logits.unsqueeze(0).expand(z.size(0), -1, -1)[positions]


class Contextual:
    """Output depends on the neighbours of each position (no time input)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.left = torch.randn(V + 1, V, generator=g) * 2
        self.right = torch.randn(V + 1, V, generator=g) * 2
        self.calls = 0
        self.shapes = []

    def __call__(self, z, sigma, positions):
        self.calls += 1
        self.shapes.append(z.clone())
        pad = torch.full((z.size(0), 1), V, dtype=torch.long)
        left = torch.cat([pad, z[:, :-1]], 1)
        right = torch.cat([z[:, 1:], pad], 1)
        return (self.left[left] + self.right[right])[positions]


def all_masked(b, length=L):
    return torch.full((b, length), MASK, dtype=torch.long)


def chi2(tokens, probs):
    """Pearson chi-square of per-position token counts against ``probs`` (L, V)."""
    n = tokens.size(0)
    counts = torch.stack([torch.bincount(tokens[:, i], minlength=V) for i in range(L)]).double()
    expected = n * probs
    support = expected > 0
    assert counts[~support].sum() == 0, "a zero-probability token was sampled"
    return float(((counts - expected)[support] ** 2 / expected[support]).sum())


def tempered(p, temperature, top_p=1.0):
    q = p[:, :MASK] ** (1.0 / temperature)
    q = q / q.sum(-1, keepdim=True)
    if top_p < 1.0:
        sq, order = q.sort(-1, descending=True)
        keep = torch.zeros_like(q, dtype=torch.bool).scatter(-1, order, (sq.cumsum(-1) - sq) < top_p)
        q = torch.where(keep, q, torch.zeros_like(q))
        q = q / q.sum(-1, keepdim=True)
    return torch.cat([q, torch.zeros(L, 1, dtype=torch.float64)], 1)


@pytest.mark.parametrize("sampler,schedule,steps", [
    ("ddpm", "loglinear", 20), ("analytic", "loglinear", 20), ("ddpm_cache", "loglinear", 20),
    ("ddpm", "cosine", 7), ("analytic", "geometric", 13), ("ddpm", "linear", 1),
])
def test_oracle_marginals(sampler, schedule, steps):
    p = marginals()
    cfg = SamplerConfig(sampler=sampler, steps=steps)
    out = sample(Oracle(p), all_masked(4000), cfg, build_schedule(schedule), MASK,
                 generator=torch.Generator().manual_seed(1))
    assert isinstance(out, SampleResult) and out.steps == steps
    assert chi2(out.tokens, p) < CHI2_MAX
    # the test has power: an off-by-one token or the wrong position fails it
    wrong = torch.cat([p[:, :MASK].roll(1, dims=1), p[:, MASK:]], 1)
    assert chi2(out.tokens, wrong) > 10 * CHI2_MAX
    assert chi2(out.tokens, p.roll(1, dims=0)) > 10 * CHI2_MAX


@pytest.mark.parametrize("sampler", ["ddpm", "analytic"])
@pytest.mark.parametrize("temperature,top_p", [(0.5, 1.0), (1.7, 1.0), (1.0, 0.7), (0.8, 0.9)])
def test_temperature_and_top_p_marginals(sampler, temperature, top_p):
    p = marginals()
    cfg = SamplerConfig(sampler=sampler, steps=10, temperature=temperature, top_p=top_p)
    out = sample(Oracle(p), all_masked(4000), cfg, build_schedule("loglinear"), MASK,
                 generator=torch.Generator().manual_seed(2))
    assert chi2(out.tokens, tempered(p, temperature, top_p)) < CHI2_MAX
    # a sampler that ignored the temperature, or the nucleus, would fail
    assert chi2(out.tokens, p) > 3 * CHI2_MAX
    if temperature != 1.0:
        assert chi2(out.tokens, tempered(p, 1.0, top_p)) > 3 * CHI2_MAX


def test_denoise_probs_exact():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0, 50.0]])
    p = torch.softmax(logits[0, :MASK].double(), -1)
    x = denoise_probs(logits, MASK)
    assert x.dtype == torch.float64 and x[0, MASK] == 0
    assert torch.allclose(x[0, :MASK], p, atol=1e-12)
    x = denoise_probs(logits, MASK, temperature=0.5)
    assert torch.allclose(x[0, :MASK], p ** 2 / (p ** 2).sum(), atol=1e-12)
    # top-p keeps the smallest prefix with mass >= top_p
    mass_top2 = float(p[:2].sum())
    x = denoise_probs(logits, MASK, top_p=mass_top2 - 1e-6)
    assert (x[0] > 0).tolist() == [True, True, False, False, False, False]
    x = denoise_probs(logits, MASK, top_p=mass_top2 + 1e-6)
    assert (x[0] > 0).tolist() == [True, True, True, False, False, False]
    assert torch.allclose(x[0, :3], p[:3] / p[:3].sum(), atol=1e-12)


def test_inverse_cdf_never_draws_zero_weight():
    w = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64).expand(5, -1)
    u = torch.tensor([0.0, 0.4999, 0.5, 0.9999, 1.0 - 2 ** -53], dtype=torch.float64)
    assert inverse_cdf(w, u).tolist() == [1, 1, 3, 3, 3]


def test_temperature_to_zero_is_argmax_and_small_top_p_is_top_token():
    p = marginals()
    argmax = p.argmax(-1).expand(300, -1)
    for cfg in (SamplerConfig(steps=5, temperature=1e-4), SamplerConfig(steps=5, top_p=0.05),
                SamplerConfig(sampler="analytic", steps=5, top_p=1e-3)):
        out = sample(Oracle(p), all_masked(300), cfg, build_schedule("loglinear"), MASK,
                     generator=torch.Generator().manual_seed(3))
        assert torch.equal(out.tokens, argmax)


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "analytic"])
def test_same_seed_same_samples(sampler):
    cfg = SamplerConfig(sampler=sampler, steps=16)
    sched = build_schedule("loglinear")
    a = sample(Contextual(), all_masked(32), cfg, sched, MASK, torch.Generator().manual_seed(7))
    b = sample(Contextual(), all_masked(32), cfg, sched, MASK, torch.Generator().manual_seed(7))
    c = sample(Contextual(), all_masked(32), cfg, sched, MASK, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def _masked_any(z):
    return bool((z == MASK).any())


def test_cache_equals_ddpm_with_fewer_calls():
    sched = build_schedule("loglinear")
    runs = {}
    for name in ("ddpm", "ddpm_cache", "analytic"):
        model = Contextual()
        cfg = SamplerConfig(sampler=name, steps=400, t_min=0.0)
        runs[name] = sample(model, all_masked(6), cfg, sched, MASK,
                            torch.Generator().manual_seed(11), retain_history=True)
        assert runs[name].network_calls == model.calls
    ddpm, cache = runs["ddpm"], runs["ddpm_cache"]
    assert torch.equal(ddpm.tokens, cache.tokens)
    assert all(torch.equal(a, b) for a, b in zip(ddpm.history, cache.history))
    assert torch.equal(runs["analytic"].tokens, ddpm.tokens)   # same kernel, same stream
    h = ddpm.history
    assert len(h) == 401 and not _masked_any(h[-1])
    # ddpm calls once per step that starts with a mask; the cache only after a change
    assert ddpm.network_calls == sum(_masked_any(h[k]) for k in range(400))
    assert ddpm.row_calls == sum(int((h[k] == MASK).any(1).sum()) for k in range(400))
    # the cache runs a row again only after that row changed: per row, not per batch
    need = [(h[k] == MASK).any(1) & (torch.ones(6, dtype=torch.bool) if k == 0
                                     else (h[k] != h[k - 1]).any(1)) for k in range(400)]
    assert cache.network_calls == sum(bool(n.any()) for n in need)
    assert cache.row_calls == sum(int(n.sum()) for n in need)
    assert cache.row_calls <= 6 * (L + 1) and 5 * cache.row_calls < ddpm.row_calls
    # the same scores: a cached row's output is the output its own call gave
    assert torch.equal(ddpm.scores, cache.scores) and bool((cache.scores < 0).all())


def test_analytic_kernel_equals_ddpm_kernel():
    x = torch.softmax(torch.randn(3, V, dtype=torch.float64), -1)
    for name in ("loglinear", "cosine", "linear", "geometric"):
        sched = build_schedule(name)
        ts = torch.linspace(1.0, 1e-5, 31, dtype=torch.float64)
        for t, s in zip(ts[:-1], ts[1:]):
            m_d, w_d = _transition("ddpm", sched, x, t, s)
            m_a, w_a = _transition("analytic", sched, x, t, s)
            assert torch.allclose(m_a, m_d, rtol=1e-9, atol=1e-12)
            assert torch.allclose(w_a / m_a[:, None], w_d, rtol=1e-9, atol=1e-12)
            stay = sched.mask_prob(s) / sched.mask_prob(t)
            assert torch.allclose(m_d, 1 - stay.expand(3))


def test_given_tokens_never_change_and_no_mask_survives():
    sched = build_schedule("loglinear")
    z = all_masked(64, 12)
    g = torch.Generator().manual_seed(0)
    given = torch.rand(64, 12, generator=g) < 0.4
    given[:, :3] = True                  # a prompt, plus scattered infill context
    z[given] = torch.randint(0, MASK, (int(given.sum()),), generator=g)
    for name in ("ddpm", "ddpm_cache", "analytic"):
        for steps in (1, 3, 50):         # 50 steps > 12 tokens
            model = Contextual()
            out = sample(model, z, SamplerConfig(sampler=name, steps=steps), sched, MASK,
                         torch.Generator().manual_seed(5), retain_history=True)
            assert out.tokens.shape == z.shape
            assert torch.equal(out.tokens[given], z[given])
            assert not _masked_any(out.tokens)
            assert ((out.tokens >= 0) & (out.tokens < MASK)).all()
            assert len(out.history) == steps + 1 and torch.equal(out.history[0], z)
            for a, b in zip(out.history[:-1], out.history[1:]):   # masks only ever shrink
                assert torch.equal(b[a != MASK], a[a != MASK])
    assert torch.equal(z[~given], torch.full_like(z[~given], MASK))   # input not modified


def test_final_argmax_fills_remaining_masks():
    p = marginals()
    model = Oracle(p)
    # t_min = 0.9 and one step: ~90% of positions are still masked after the step
    out = sample(model, all_masked(200), SamplerConfig(steps=1, t_min=0.9),
                 build_schedule("loglinear"), MASK, torch.Generator().manual_seed(4),
                 retain_history=True)
    still = out.history[-1] == MASK
    assert 0.8 < still.double().mean() < 0.95
    assert torch.equal(out.tokens[still], p.argmax(-1).expand(200, -1)[still])
    assert out.network_calls == model.calls == 2
    # scores: the oracle's log-probability (renormalised without <mask>) of each token
    want = p.log().expand(200, -1, -1).gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out.scores.double(), want, atol=1e-5)
    # nothing masked -> nothing to do, no network call
    assert sample(model, out.tokens, SamplerConfig(steps=3), build_schedule("loglinear"),
                  MASK).network_calls == 0


def test_time_conditioned_sigma_is_passed():
    sched = build_schedule("loglinear")
    model = Oracle(marginals())
    sample(model, all_masked(2), SamplerConfig(steps=5, time_conditioned=True, t_min=0.5),
           sched, MASK, torch.Generator().manual_seed(0))
    ts = torch.linspace(1.0, 0.5, 6, dtype=torch.float64)
    # 5 steps, each at its t, then the final argmax call at t_min (~half still masked)
    got = torch.stack(model.sigmas)
    assert got.shape == (6, 2) and torch.equal(got[:, 0], got[:, 1])
    assert torch.allclose(got[:, 0].double(), sched.sigma(ts), rtol=1e-6)


def test_semi_ar_length_and_prompt():
    sched = build_schedule("loglinear")
    cfg = SamplerConfig(sampler="ddpm_cache", steps=8)
    prompt = torch.tensor([[0, 1, 2], [3, 4, 0]])
    model = Contextual()
    out = sample_semi_ar(model, prompt, total_length=23, window=8, stride=3, config=cfg,
                         schedule=sched, mask_index=MASK,
                         generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 23)
    assert torch.equal(out.tokens[:, :3], prompt)
    assert not _masked_any(out.tokens)
    # the model sees its length only (all rows, or the rows the cache could not serve)
    assert all(z.size(1) == 8 and z.size(0) in (1, 2) for z in model.shapes)
    # windows: first 8 tokens, then ceil((23 - 8) / 3) = 5 windows of stride 3
    assert out.steps == 6 * 8 and out.network_calls == model.calls
    # every window's fixed context is the 5 last tokens generated before it
    first_calls = [z for z in model.shapes
                   if z.size(0) == 2 and ((z == MASK).sum(-1) == 3).all() and (z[:, 5:] == MASK).all()]
    assert len(first_calls) == 5
    for i, z in enumerate(first_calls):
        start = 8 + 3 * i - 5
        assert torch.equal(z[:, :5], out.tokens[:, start:start + 5])
    # no prompt; length shorter than the window; stride == window; long prompt
    for prefix, total, stride in ((None, 5, 4), (None, 17, 8), (torch.zeros(2, 10).long(), 12, 2)):
        res = sample_semi_ar(Contextual(), prefix, total, 8, stride, cfg, sched, MASK,
                             torch.Generator().manual_seed(1), batch_size=2)
        assert res.tokens.shape == (2, total) and not _masked_any(res.tokens)
        if prefix is not None:
            assert torch.equal(res.tokens[:, :10], prefix)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positive integer"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="positive integer"):
        SamplerConfig(steps=-3)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplerConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplerConfig(top_p=1.5)
    with pytest.raises(ValueError, match="ddpm, ddpm_cache, analytic"):
        SamplerConfig(sampler="euler")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplerConfig(temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplerConfig(temperature=-1.0)
    with pytest.raises(ValueError, match=r"t_min must be in \[0, 1\)"):
        SamplerConfig(t_min=1.0)
    with pytest.raises(ValueError, match="time-conditioned.*sampler='ddpm'"):
        SamplerConfig(sampler="ddpm_cache", time_conditioned=True)
    cfg = SamplerConfig(steps=2)
    cfg.steps = 0                           # mutated after construction: caught by sample()
    with pytest.raises(ValueError, match="positive integer"):
        sample(Contextual(), all_masked(1), cfg, build_schedule("loglinear"), MASK)
    cfg = SamplerConfig(steps=2)
    sched = build_schedule("loglinear")
    prompt = torch.zeros(1, 9).long()
    with pytest.raises(ValueError, match=r"stride must be in \[1, window=8\]"):
        sample_semi_ar(Contextual(), prompt, 20, 8, 0, cfg, sched, MASK)
    with pytest.raises(ValueError, match=r"stride must be in \[1, window=8\]"):
        sample_semi_ar(Contextual(), prompt, 20, 8, 9, cfg, sched, MASK)
    with pytest.raises(ValueError, match="more than total_length=5"):
        sample_semi_ar(Contextual(), prompt, 5, 8, 4, cfg, sched, MASK)
    with pytest.raises(ValueError, match="contains mask_index"):
        sample_semi_ar(Contextual(), all_masked(1, 3), 10, 8, 4, cfg, sched, MASK)


def test_unigram_entropy():
    tokens = torch.tensor([[1, 1, 1, 1], [1, 2, 1, 2], [0, 1, 2, 3]])
    want = (0.0 + math.log(2) + math.log(4)) / 3
    assert unigram_entropy(tokens) == pytest.approx(want)
    # ignored ids are left out; a row with nothing left is skipped
    tokens = torch.tensor([[1, 2, 9, 9], [9, 9, 9, 9]])
    assert unigram_entropy(tokens, ignore=(9,)) == pytest.approx(math.log(2))
