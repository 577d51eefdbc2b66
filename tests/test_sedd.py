"""SEDD (score entropy, absorbing graph): exact cases, its relation to the MDLM bound,
finite gradients at t = eps, and fairseq-train/-validate/-generate end to end."""
import json
import math
import re

import pytest
import torch

from conftest import USER_DIR, fairseq_cli, train_tiny
from mdlm_plugin.diffusion.objective import corrupt, nelbo
from mdlm_plugin.diffusion.samplers import denoise_probs
from mdlm_plugin.diffusion.schedules import SCHEDULES, build_schedule
from mdlm_plugin.diffusion.sedd import (log_expm1, log_scores, score_entropy,
                                        score_entropy_bound, score_probs)
from test_objective import MASK, PAD, V, independent_oracle

N_SYMBOLS = V + 2                   # data, <mask>, pad: the oracle's output width


def exact_score_oracle(log_p):
    """The independent oracle's logits shifted by log(V - 1): then the log scores are
    exactly log p - log expm1(sigma), the true concrete score of independent positions."""
    base = independent_oracle(log_p)
    return lambda z, sigma, positions: base(z, sigma, positions) + math.log(N_SYMBOLS - 1)


def random_denoiser(seed=0):
    """Logits that depend on the token and its left neighbour (so Z varies by position)."""
    g = torch.Generator().manual_seed(seed)
    W, U = torch.randn(2, N_SYMBOLS, N_SYMBOLS, generator=g)
    return lambda z, sigma, positions: (W[z] + U[z.roll(1, -1)])[positions]


@pytest.mark.parametrize("name", SCHEDULES)
def test_bound_is_tight_for_independent_oracle(name):
    """With the exact scores the score entropy is w(t) (-log p(x0)) per masked token,
    so its expectation over t is the exact NLL (as for MDLM's NELBO)."""
    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    x = torch.multinomial(p, 64 * 32, replacement=True).view(64, 32)
    exact = -torch.log(p)[x].mean().item()
    sched, g = build_schedule(name), torch.Generator().manual_seed(1)
    est = [score_entropy_bound(exact_score_oracle(p.log()), x, sched, MASK, generator=g)
           for _ in range(200)]
    per_pass = torch.tensor([e.loss.item() / e.n_tokens for e in est])
    se = per_pass.std().item() / math.sqrt(len(est))
    assert abs(per_pass.mean().item() - exact) < 4 * se + 2e-3 * exact, (per_pass.mean(), exact, se)


def test_score_entropy_is_zero_only_at_the_true_score():
    sigma = torch.tensor([1e-3, 0.3, 2.0, 7.0], dtype=torch.float64)
    x0 = torch.tensor([0, 3, 5, 1])
    exact = torch.full((4, N_SYMBOLS), float("-inf"))
    exact[torch.arange(4), x0] = -log_expm1(sigma).float()        # s = r one-hot(x0)
    torch.testing.assert_close(score_entropy(exact, sigma, x0), torch.zeros(4),
                               atol=2e-4, rtol=0)
    noisy = log_scores(torch.randn(4, N_SYMBOLS), sigma, MASK)
    assert bool((score_entropy(noisy, sigma, x0) > 0).all())


def test_score_entropy_is_mdlm_bound_plus_a_mass_penalty():
    """Same draws (same generator): per sequence, SEDD - MDLM = the sum over masked
    tokens of w(t) (Z - 1 - log Z) >= 0, Z = sum_{y != mask} e^f[y] / (V - 1)."""
    torch.manual_seed(0)
    x = torch.randint(0, V, (16, 24))
    x[3, 20:] = PAD
    pad, sched, den = x.eq(PAD), build_schedule("loglinear"), random_denoiser()
    sedd = score_entropy_bound(den, x, sched, MASK, pad, generator=torch.Generator().manual_seed(5))
    mdlm = nelbo(den, x, sched, MASK, pad, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sedd.t, mdlm.t) and sedd.n_masked == mdlm.n_masked > 0
    assert sedd.n_tokens == mdlm.n_tokens == int((~pad).sum())
    _, t, z_t, masked = corrupt(x, sched, MASK, pad, generator=torch.Generator().manual_seed(5))
    f = den(z_t, None, masked).double()
    f[:, MASK] = float("-inf")
    Z = f.exp().sum(-1) / (N_SYMBOLS - 1)
    w = sched.weight(t.double()).unsqueeze(-1).expand_as(x)[masked]
    row = torch.arange(16).unsqueeze(-1).expand_as(x)[masked]
    gap = torch.zeros(16, dtype=torch.float64).index_add_(0, row, w * (Z - 1 - torch.log(Z)))
    torch.testing.assert_close((sedd.per_sequence - mdlm.per_sequence).double(), gap,
                               rtol=1e-4, atol=1e-3)
    assert bool((gap > 0).all())


def test_normalised_scores_give_the_mdlm_bound_exactly():
    torch.manual_seed(0)
    x = torch.randint(0, V, (8, 16))
    sched = build_schedule("cosine")
    base = random_denoiser(1)

    def normalised(z, sigma, positions):   # total score mass Z = 1
        f = base(z, sigma, positions).clone()
        f[:, MASK] = float("-inf")
        f = f - torch.logsumexp(f, -1, keepdim=True) + math.log(N_SYMBOLS - 1)
        f[:, MASK] = 9.0                    # ignored by both
        return f

    a = score_entropy_bound(normalised, x, sched, MASK, generator=torch.Generator().manual_seed(2))
    b = nelbo(normalised, x, sched, MASK, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.per_sequence, b.per_sequence, rtol=1e-5, atol=1e-4)


def test_gradient_is_finite_at_t_eps_and_loss_is_fp32():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(N_SYMBOLS, N_SYMBOLS)
    x = torch.randint(0, V, (256, 64))      # ~16 tokens masked at t = eps
    sched = build_schedule("loglinear")
    for t in (1e-3, 1.0):
        for dtype in (torch.float32, torch.float16):
            emb.zero_grad()
            den = lambda z, sigma, positions: emb(z)[positions].to(dtype)  # noqa: E731
            terms = score_entropy_bound(den, x, sched, MASK, t=torch.full((256,), t),
                                        generator=torch.Generator().manual_seed(0))
            assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
            assert terms.n_masked > 0
            terms.loss.backward()
            assert torch.isfinite(emb.weight.grad).all() and emb.weight.grad.abs().sum() > 0


def test_samplers_read_the_normalised_scores():
    """The generator's x_theta (``denoise_probs`` of the logits) is exactly the SEDD
    model's normalised score at any noise level: no flag needed to sample it."""
    logits = torch.randn(5, N_SYMBOLS)
    sigma = torch.tensor([1e-3, 0.1, 1.0, 4.0, 7.0], dtype=torch.float64)
    probs = score_probs(log_scores(logits, sigma, MASK))
    torch.testing.assert_close(probs, denoise_probs(logits, MASK), rtol=1e-6, atol=1e-12)
    assert bool((probs[:, MASK] == 0).all())


def _fields(proc, tag):
    line = [l for l in (proc.stdout + proc.stderr).splitlines() if tag in l][-1]
    return dict(re.findall(r"\| (\w+) ([-\d.]+)", line))


def test_sedd_end_to_end(ptb_tiny, tmp_path):
    """fairseq-train --criterion sedd lowers its loss; fairseq-validate (criterion read
    from the checkpoint) reports the bound with K = 2 passes, its SE and the exact token
    count; the analytic sampler draws from it through fairseq-generate."""
    save = tmp_path / "ckpt"
    log = train_tiny(ptb_tiny, save, criterion="sedd", updates=40)
    inner = [json.loads(l[l.index("{"):]) for l in log.splitlines() if "| train_inner |" in l]
    assert float(inner[-1]["loss"]) < float(inner[0]["loss"]) - 1.0
    ckpt = save / "checkpoint_last.pt"
    val = _fields(fairseq_cli(
        "validate", ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion", "--path",
        ckpt, "--valid-subset", "test", "--batch-size", "8", "--cpu", "--eval-passes", "2"),
        "valid on 'test'")
    from fairseq.data import data_utils
    split = data_utils.load_indexed_dataset(str(ptb_tiny / "test"), None)
    n = int(split.sizes.sum())       # (keep the dataset alive: sizes is a view of its mmap)
    assert int(val["scored_tokens"]) == n
    assert float(val["bound_se"]) > 0
    assert float(val["ppl"]) == pytest.approx(2 ** float(val["loss"]), rel=1e-3)
    gen = fairseq_cli("generate", ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                      "--path", ckpt, "--tokens-per-sample", "32", "--gen-subset", "test",
                      "--batch-size", "16", "--sampler", "analytic", "--steps", "8", "--cpu",
                      "--seed", "1")
    hypos = [l.split("\t") for l in gen.stdout.splitlines() if l.startswith("H-")]
    targets = [l for l in gen.stdout.splitlines() if l.startswith("T-")]
    assert len(hypos) == len(targets) > 0
    assert all(len(h) == 3 and h[2].strip() and "<mask>" not in h[2] for h in hypos)
