"""Tests of mdlm_plugin.diffusion.samplers against denoisers with known answers."""
import math
import re

import pytest
import torch

from mdlm_plugin.diffusion.samplers import (
    Confidence, ReMDM, SampleResult, SamplerConfig, SamplerError, StepContext, denoise_probs,
    inverse_cdf, repeated_ngram_share, sample, sample_semi_ar, unigram_entropy, _leave_probability,
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
    """The reference repositories' nucleus: the tokens whose cumulative mass (sorted
    descending, themselves included) is <= top_p, and always the top one."""
    q = p[:, :MASK] ** (1.0 / temperature)
    q = q / q.sum(-1, keepdim=True)
    if top_p < 1.0:
        sq, order = q.sort(-1, descending=True)
        kept = sq.cumsum(-1) <= top_p
        kept[:, 0] = True
        keep = torch.zeros_like(q, dtype=torch.bool).scatter(-1, order, kept)
        q = torch.where(keep, q, torch.zeros_like(q))
        q = q / q.sum(-1, keepdim=True)
    return torch.cat([q, torch.zeros(L, 1, dtype=torch.float64)], 1)


@pytest.mark.parametrize("sampler,schedule,steps", [
    ("ddpm", "loglinear", 20), ("analytic", "loglinear", 20), ("ddpm_cache", "loglinear", 20),
    ("first_hitting", "loglinear", 20), ("first_hitting", "cosine", 1),
    ("ddpm", "cosine", 7), ("analytic", "geometric", 13), ("ddpm", "linear", 1),
])
def test_oracle_marginals(sampler, schedule, steps):
    p = marginals()
    cfg = SamplerConfig(sampler=sampler, steps=steps)
    out = sample(Oracle(p), all_masked(4000), cfg, build_schedule(schedule), MASK,
                 generator=torch.Generator().manual_seed(1))
    assert isinstance(out, SampleResult) and out.steps == (L if sampler == "first_hitting" else steps)
    assert chi2(out.tokens, p) < CHI2_MAX
    # the test has power: an off-by-one token or the wrong position fails it
    wrong = torch.cat([p[:, :MASK].roll(1, dims=1), p[:, MASK:]], 1)
    assert chi2(out.tokens, wrong) > 10 * CHI2_MAX
    assert chi2(out.tokens, p.roll(1, dims=0)) > 10 * CHI2_MAX


@pytest.mark.parametrize("sampler", ["ddpm", "analytic"])
# cumulative masses (temperature 1) .4 .7 .85 .95; (0.8) .446 .757 .888 .967: no
# top_p sits on a boundary, and each keeps one token fewer than the old rule
@pytest.mark.parametrize("temperature,top_p", [(0.5, 1.0), (1.7, 1.0), (1.0, 0.75), (0.8, 0.9)])
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
    # top-p keeps the prefix whose cumulative mass is <= top_p, and the top token
    mass_top2 = float(p[:2].sum())
    x = denoise_probs(logits, MASK, top_p=mass_top2 - 1e-6)
    assert (x[0] > 0).tolist() == [True, False, False, False, False, False]
    x = denoise_probs(logits, MASK, top_p=mass_top2 + 1e-6)
    assert (x[0] > 0).tolist() == [True, True, False, False, False, False]
    assert torch.allclose(x[0, :2], p[:2] / p[:2].sum(), atol=1e-12)
    x = denoise_probs(logits, MASK, top_p=float(p[0]) / 2)         # the top token always
    assert (x[0] > 0).tolist() == [True, False, False, False, False, False]


def test_top_p_keeps_the_reference_set():
    """(.5, .3, .15, .05) at p = 0.9: the reference repositories (kuleshov-group/remdm,
    bd3lms: ``cumsum <= p``, top token kept) sample from (.625, .375, 0, 0), not from
    (.526, .316, .158, 0) (the token whose mass crosses p kept too)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0], dtype=torch.float64).log()
    logits[MASK] = 3.0
    x = denoise_probs(logits.unsqueeze(0), MASK, top_p=0.9)[0]
    want = torch.tensor([0.625, 0.375, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(x, want, rtol=0, atol=1e-12)


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


@pytest.mark.parametrize("name", ["ddpm", "ddpm_cache", "analytic", "first_hitting", "remdm"])
def test_a_step_that_draws_nothing_does_no_float64_work(name):
    """float64 distributions over the vocabulary only where a token is drawn: one row
    per token (T = 400 steps for 8 positions: most steps change no row), and for
    ReMDM one per unmasking, remasked tokens drawn again."""
    cfg = SamplerConfig(sampler=name, steps=400, remdm_eta=0.05, remdm_strategy="rescale")
    z = all_masked(6)
    z[1, :3] = 2
    out = sample(Contextual(), z, cfg, build_schedule("loglinear"), MASK,
                 torch.Generator().manual_seed(11), retain_history=True)
    h = torch.stack(out.history)
    unmasked = int(((h[:-1] == MASK) & (h[1:] != MASK)).sum()) + int((h[-1] == MASK).sum())
    assert out.prob_rows == unmasked
    if name != "remdm":
        assert unmasked == int((z == MASK).sum())


def test_analytic_kernel_equals_ddpm_kernel():
    """The analytic (Tweedie) jump probabilities expm1(d) x[v] / expm1(sigma_t), summed
    over v, are the ddpm kernel's probability of leaving the mask, and the token is
    drawn from x in both."""
    x = torch.softmax(torch.randn(3, V, dtype=torch.float64), -1)
    for name in ("loglinear", "cosine", "linear", "geometric"):
        sched = build_schedule(name)
        ts = torch.linspace(1.0, 1e-5, 31, dtype=torch.float64)
        for t, s in zip(ts[:-1], ts[1:]):
            jump = torch.expm1(sched.sigma(t) - sched.sigma(s)) * x / torch.expm1(sched.sigma(t))
            m_a = _leave_probability("analytic", sched, t, s)
            assert torch.allclose(jump.sum(-1), m_a.expand(3), rtol=1e-9, atol=1e-12)
            stay = sched.mask_prob(s) / sched.mask_prob(t)
            assert torch.allclose(_leave_probability("ddpm", sched, t, s), 1 - stay)
            assert torch.allclose(m_a, 1 - stay, rtol=1e-9, atol=1e-12)


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
    for name in ("ddpm_cache", "first_hitting"):
        with pytest.raises(SamplerError, match=f"sampler '{name}' needs a model without time "
                                               f"conditioning.*Use sampler 'ddpm'") as e:
            SamplerConfig(sampler=name, time_conditioned=True)
        assert e.value.field == "sampler"
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


# ------------------------------------------------------------------ the step rules

def test_pinned_outputs_of_the_ancestral_samplers():
    """The tokens drawn before the samplers became step rules (same seed, same model)."""
    sched = build_schedule("loglinear")
    z = all_masked(3, 8)
    z[1, :2] = torch.tensor([0, 1])
    z[2, 4] = 3
    want = [[3, 0, 4, 3, 0, 3, 0, 4], [0, 1, 4, 2, 1, 2, 2, 2], [3, 1, 1, 4, 3, 1, 1, 0]]
    for name in ("ddpm", "ddpm_cache", "analytic"):
        out = sample(Contextual(), z, SamplerConfig(sampler=name, steps=10), sched, MASK,
                     torch.Generator().manual_seed(21))
        assert out.tokens.tolist() == want
        assert float(out.scores.double().sum()) == pytest.approx(-14.1377, abs=1e-4)
    out = sample_semi_ar(Contextual(), torch.tensor([[0, 1], [2, 3]]), 14, 8, 3,
                         SamplerConfig(sampler="ddpm", steps=4), sched, MASK,
                         torch.Generator().manual_seed(22))
    assert out.tokens.tolist() == [[0, 1, 4, 3, 1, 3, 3, 2, 1, 1, 0, 4, 1, 1],
                                   [2, 3, 1, 1, 4, 1, 1, 2, 1, 1, 4, 1, 1, 0]]


def test_first_hitting_one_network_call_per_masked_token():
    z = all_masked(5, 12)
    g = torch.Generator().manual_seed(3)
    given = torch.rand(5, 12, generator=g) < torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0]).unsqueeze(1)
    z[given] = 2
    model = Contextual()
    out = sample(model, z, SamplerConfig(sampler="first_hitting", steps=3), build_schedule("loglinear"),
                 MASK, torch.Generator().manual_seed(4), retain_history=True)
    per_row = (z == MASK).sum(1)
    assert out.row_calls == int(per_row.sum()) and out.steps == int(per_row.max())
    assert out.network_calls == model.calls == int(per_row.max())
    assert torch.equal(out.tokens[given], z[given]) and not _masked_any(out.tokens)
    for a, b in zip(out.history[:-1], out.history[1:]):       # one position per row a step
        assert torch.equal((a != b).sum(1), ((a == MASK).sum(1) > 0).long())


def test_remdm_with_eta_zero_is_ddpm():
    sched = build_schedule("loglinear")
    z = all_masked(6, 10)
    z[:, :2] = 1
    runs = [sample(Contextual(), z, SamplerConfig(sampler=name, steps=30, remdm_eta=0.0), sched,
                   MASK, torch.Generator().manual_seed(9)) for name in ("ddpm", "remdm")]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].scores, runs[1].scores)


def remdm_context(sched, z, given, x, scores, chance, t, s):
    """Step 0 from t to s; the network's distribution is ``x`` (V,) at every position."""
    def probs_at(where):
        return x.expand(int(where.sum()), -1)
    return StepContext(0, torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64),
                       z, z == MASK, given, scores, chance, MASK, sched,
                       torch.Generator().manual_seed(1), probs_at)


X1 = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0, 0.0], dtype=torch.float64)


def one_remdm_step(cfg, t, s, n=200000):
    """Positions 0 and 1 decoded (tokens 2 and 3, drawn with probabilities 0.3 and 0.6
    under the distribution drawn from, 0.9 at temperature 1), position 2 masked."""
    sched = build_schedule("loglinear")
    z = torch.tensor([[2, 3, MASK]]).expand(n, -1).clone()
    given = torch.zeros(n, 3, dtype=torch.bool)
    scores = torch.tensor([[math.log(0.9), math.log(0.9), 0.0]]).expand(n, -1).clone()
    chance = torch.tensor([[0.3, 0.6, 0.0]], dtype=torch.float64).expand(n, -1).clone()
    new = ReMDM(cfg).step(remdm_context(sched, z, given, X1, scores, chance, t, s))
    assert bool((new[:, 0][new[:, 0] != MASK] == 2).all())
    assert bool((new[:, 1][new[:, 1] != MASK] == 3).all())
    remask = [float((new[:, i] == MASK).double().mean()) for i in (0, 1)]
    return new, remask


def assert_masked_position(new, a_t, a_s, sigma_masked, n=200000):
    want = torch.cat([(a_s - (1 - sigma_masked) * a_t) * X1[:MASK],
                      torch.tensor([1 - a_s - sigma_masked * a_t], dtype=torch.float64)]) / (1 - a_t)
    got = torch.bincount(new[:, 2], minlength=V).double() / n
    assert torch.allclose(got, want, atol=4 * math.sqrt(0.25 / n)), (got, want)


def close(freq, p, n=200000):
    return abs(freq - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / n)


@pytest.mark.parametrize("t,s", [(0.6, 0.5), (0.3, 0.2)])   # sigma_max clamped to 1; 0.286
@pytest.mark.parametrize("strategy", ["cap", "rescale", "conf"])
def test_remdm_one_step_probabilities(strategy, t, s):
    """The frequencies of one step over many rows against the formulas, by hand. conf
    weighs the decoded tokens by the probability under the distribution they were
    drawn from (``chance``), not by their temperature-1 score."""
    sched = build_schedule("loglinear")
    cfg = SamplerConfig(sampler="remdm", remdm_strategy=strategy, remdm_eta=0.1)
    new, remask = one_remdm_step(cfg, t, s)
    a_t, a_s = float(sched.alpha(torch.tensor(t))), float(sched.alpha(torch.tensor(s)))
    sigma_max = min(1.0, (1 - a_s) / a_t)
    if strategy == "conf":
        w = torch.softmax(-torch.tensor([0.3, 0.6], dtype=torch.float64), 0)
        sigma = [sigma_max * float(w[0]), sigma_max * float(w[1])]
        assert remask[0] > remask[1]         # the less likely draw is remasked more often
    else:
        one = min(0.1, sigma_max) if strategy == "cap" else 0.1 * sigma_max
        sigma = [one, one]
    assert close(remask[0], sigma[0]) and close(remask[1], sigma[1]), (remask, sigma)
    assert_masked_position(new, a_t, a_s, 0.0 if strategy == "conf" else sigma[0])


def test_remdm_loop_held_phase_remasks_with_eta():
    """The reference's remdm-loop: alpha held at alpha_on for t_off < t <= t_on, and
    every decoded token remasked with sigma = eta there (not the strategy's sigma);
    before t_on (and after t_off) a plain ddpm step of the loop's alpha, no remasking."""
    cfg = SamplerConfig(sampler="remdm", remdm_loop=True, remdm_eta=0.05)
    new, remask = one_remdm_step(cfg, 0.3, 0.2)
    assert close(remask[0], 0.05) and close(remask[1], 0.05), remask
    assert_masked_position(new, 0.9, 0.9, 0.05)            # leaves w.p. eta a_on / (1 - a_on)
    new, remask = one_remdm_step(cfg, 0.8, 0.7)
    assert remask == [0.0, 0.0]
    a_one = float(build_schedule("loglinear").alpha(torch.tensor(1.0)))
    a_t, a_s = (a_one + (0.9 - a_one) * (1 - u) / 0.45 for u in (0.8, 0.7))
    assert_masked_position(new, a_t, a_s, 0.0)
    # the reference's eta per script: cap 0.008, rescale 0.015, loop 0.02; the held
    # phase's sigma_max (1 - alpha_on) / alpha_on bounds the loop's eta
    assert [SamplerConfig(sampler="remdm", remdm_strategy=k).eta for k in ("cap", "rescale")] \
        == [0.008, 0.015]
    assert SamplerConfig(sampler="remdm", remdm_loop=True).eta == 0.02
    with pytest.raises(SamplerError, match=re.escape("eta must be <= (1 - alpha_on) / alpha_on")):
        SamplerConfig(sampler="remdm", remdm_loop=True, remdm_eta=0.2)
    with pytest.raises(SamplerError, match="takes no strategy") as e:
        SamplerConfig(sampler="remdm", remdm_loop=True, remdm_strategy="rescale")
    assert e.value.field == "remdm_strategy"


def test_remdm_conf_weights_are_the_drawn_from_probabilities():
    """Through the sampling loop, with top-p: each decoded token's ``chance`` is its
    probability under the nucleus distribution it was drawn from."""
    p = marginals()
    cfg = SamplerConfig(sampler="remdm", remdm_strategy="conf", steps=6, top_p=0.75)
    seen = []

    class Spy(ReMDM):
        def step(self, ctx):
            seen.append((ctx.z.clone(), ctx.chance.clone()))
            return super().step(ctx)

    from mdlm_plugin.diffusion import samplers
    samplers.RULES["remdm"], before = Spy, samplers.RULES["remdm"]
    try:
        sample(Oracle(p), all_masked(50), cfg, build_schedule("loglinear"), MASK,
               torch.Generator().manual_seed(5))
    finally:
        samplers.RULES["remdm"] = before
    nucleus = tempered(p, 1.0, 0.75)
    z, chance = seen[-1]
    decoded = z != MASK
    assert bool(decoded.any())
    want = nucleus.expand(50, -1, -1).gather(-1, z.clamp(max=MASK).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chance[decoded], want[decoded], atol=1e-6)
    assert not torch.allclose(chance[decoded], p.expand(50, -1, -1).gather(
        -1, z.clamp(max=MASK).unsqueeze(-1)).squeeze(-1)[decoded], atol=1e-3)


def test_remdm_remasks_and_ends_without_masks():
    sched = build_schedule("loglinear")
    z = all_masked(64, 12)
    z[:, :3] = 4
    for cfg in (SamplerConfig(sampler="remdm", steps=40, remdm_eta=0.5, remdm_strategy="rescale"),
                SamplerConfig(sampler="remdm", steps=40, remdm_eta=0.3, remdm_loop=True,
                              remdm_alpha_on=0.5)):
        out = sample(Contextual(), z, cfg, sched, MASK, torch.Generator().manual_seed(2),
                     retain_history=True)
        h = torch.stack(out.history)
        remasked = (h[:-1] != MASK) & (h[1:] == MASK)
        assert bool(remasked.any()) and not bool(remasked[:, :, :3].any())
        assert not _masked_any(out.tokens) and bool((out.tokens[:, :3] == 4).all())
        assert bool((out.scores[:, 3:] < 0).all()) and bool((out.scores[:, :3] == 0).all())


@pytest.mark.parametrize("schedule,per_step,steps", [("cosine", 0, 5), ("linear", 0, 4),
                                                     ("cosine", 3, 4), ("linear", 0, 15)])
def test_confidence_commits_the_scheduled_most_confident(schedule, per_step, steps):
    sched = build_schedule("loglinear")
    z = all_masked(6, 10)
    z[1, :4] = torch.tensor([0, 1, 2, 3])          # a prompt
    z[2, ::3] = 4                                  # infill context
    cfg = SamplerConfig(sampler="confidence", steps=steps, commit_schedule=schedule,
                        commit_per_step=per_step)
    out = sample(Contextual(), z, cfg, sched, MASK, torch.Generator().manual_seed(6),
                 retain_history=True)
    assert not _masked_any(out.tokens) and torch.equal(out.tokens[z != MASK], z[z != MASK])
    n = (z == MASK).sum(1).double()
    for k, (a, b) in enumerate(zip(out.history[:-1], out.history[1:])):
        frac = (k + 1) / steps
        left = (n - per_step * (k + 1)).clamp(min=0) if per_step else (
            n * (math.cos(math.pi / 2 * frac) if schedule == "cosine" else 1 - frac)).floor()
        if k == steps - 1:
            left = torch.zeros_like(n)
        # MaskGIT's clamp: at most one less than the row's masked positions stay masked
        left = torch.minimum(left, ((a == MASK).sum(1).double() - 1).clamp(min=0))
        assert torch.equal((b == MASK).sum(1).double(), left), k
    # committed = the most confident draws: replay step 0 of row 0 on the Contextual model
    model = Contextual()
    x = denoise_probs(model(z[:1], None, z[:1] == MASK), MASK)
    u = torch.rand(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    drawn = inverse_cdf(x, u[0])
    conf = x.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    committed = out.history[1][0] != MASK
    assert torch.equal(out.history[1][0][committed], drawn[committed])
    if bool(committed.any()) and not bool(committed.all()):
        assert conf[committed].min() >= conf[~committed].max()


@pytest.mark.parametrize("n,steps", [(16, 16), (128, 128), (10, 15), (12, 5)])
def test_confidence_commits_at_least_one_token_every_step(n, steps):
    """With a cosine schedule and T = n the unclamped schedule commits nothing in 3 of
    16 steps (26 of 128); clamped, every step that calls the network for a row commits
    at least one of its tokens, and a finished row is not evaluated again."""
    z = all_masked(3, n)
    z[1, : n // 2] = 4                                          # a prompt
    model = Contextual()
    out = sample(model, z, SamplerConfig(sampler="confidence", steps=steps),
                 build_schedule("loglinear"), MASK, torch.Generator().manual_seed(3),
                 retain_history=True)
    h = torch.stack(out.history)
    had = (h[:-1] == MASK).any(2)                               # (steps, rows)
    committed = ((h[:-1] == MASK) & (h[1:] != MASK)).sum(2)
    assert bool((committed[had] >= 1).all())
    assert out.row_calls == int(had.sum())                      # no call commits nothing
    assert not _masked_any(out.tokens)
    assert out.prob_rows == int((h[:-1] == MASK).sum())         # drawn at every masked position
    unclamped = [math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps)) for k in range(steps - 1)] + [0]
    if (n, steps) == (16, 16):
        assert sum(a == b for a, b in zip([n] + unclamped, unclamped)) == 3


def test_confidence_noise_is_annealed_as_maskgit():
    """Gumbel noise on the log-confidence scaled by confidence_noise (1 - (k + 1)/T):
    replaying step 0 with that scale gives the committed positions."""
    sched = build_schedule("loglinear")
    z = all_masked(8, 10)
    cfg = SamplerConfig(sampler="confidence", steps=2, confidence_noise=2.0)
    out = sample(Contextual(), z, cfg, sched, MASK, torch.Generator().manual_seed(6),
                 retain_history=True)
    assert not _masked_any(out.tokens) and bool((out.scores < 0).all())
    g = torch.Generator().manual_seed(6)
    u = torch.rand(8, 10, dtype=torch.float64, generator=g)
    u_noise = torch.rand(8, 10, dtype=torch.float64, generator=g)
    x = denoise_probs(Contextual()(z, None, z == MASK), MASK).view(8, 10, V)
    drawn = inverse_cdf(x.view(80, V), u.view(80)).view(8, 10)
    gumbel = -torch.log(-torch.log(u_noise))
    for scale, agrees in ((2.0 * (1 - 1 / 2), True), (2.0, False), (0.0, False)):
        conf = x.gather(-1, drawn.unsqueeze(-1)).squeeze(-1).log() + scale * gumbel
        left = math.floor(10 * math.cos(math.pi / 2 / 2))
        top = conf.argsort(1, descending=True)[:, : 10 - left]
        want = torch.zeros(8, 10, dtype=torch.bool).scatter(1, top, True)
        assert torch.equal(out.history[1] != MASK, want) == agrees


def test_bad_sampler_parameters_one_error_each():
    cases = [(dict(remdm_eta=-0.1), "remdm_eta", "eta must be >= 0"),
             (dict(remdm_t_on=0.3, remdm_t_off=0.3), "remdm_t_off", "t_off must be in [0, t_on"),
             (dict(remdm_strategy="max"), "remdm_strategy", "unknown ReMDM strategy 'max'"),
             (dict(remdm_alpha_on=1.0), "remdm_alpha_on", "alpha_on must be in (0, 1)"),
             (dict(commit_schedule="exp"), "commit_schedule", "unknown commit schedule 'exp'"),
             (dict(commit_per_step=-1), "commit_per_step", "commit_per_step must be an integer"),
             (dict(confidence_noise=-1.0), "confidence_noise", "confidence_noise must be >= 0")]
    for kw, field, message in cases:
        with pytest.raises(SamplerError, match=re.escape(message)) as e:
            SamplerConfig(sampler="remdm", **kw)
        assert e.value.field == field
    cfg = SamplerConfig(sampler="confidence", steps=3, commit_per_step=2)
    with pytest.raises(SamplerError, match="the commit schedule does not finish: 2 positions "
                                           "per step x 3 steps < 8 masked") as e:
        sample(Contextual(), all_masked(2), cfg, build_schedule("loglinear"), MASK)
    assert e.value.field == "commit_per_step"


def test_repeated_ngram_share():
    tokens = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    # row 0: 5 four-grams, 4 distinct -> 1/5 repeated; row 1: none
    assert repeated_ngram_share(tokens) == pytest.approx((0.2 + 0.0) / 2)
    assert repeated_ngram_share(torch.tensor([[7, 7, 7, 7, 7, 9]]), ignore=(9,)) == pytest.approx(0.5)
    assert repeated_ngram_share(torch.tensor([[7] * 6])) == pytest.approx(2 / 3)
    assert repeated_ngram_share(torch.tensor([[1, 2, 3]])) == 0.0
