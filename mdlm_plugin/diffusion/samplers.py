"""Samplers for masked diffusion language models (MDLM). Pure torch.

The network is reached only through the denoiser convention of ``objective.py``:
``denoiser(z_t, sigma, positions) -> logits`` (N, V) for the selected positions,
row-major. The samplers always ask for exactly the currently masked positions.

A sampler walks a time grid t_0 = 1 > t_1 > ... > t_T = t_min (``steps`` equal
steps, ``torch.linspace(1, t_min, steps + 1)``). At each step t -> s only masked
positions can change; a given token (prompt, infill context, or one unmasked at an
earlier step) is never touched, which is the SUBS carry-over rule. After the last
step any ``<mask>`` left is replaced by the argmax of x_theta, so the output never
contains ``mask_index``.

x_theta (the denoiser's clean-token distribution, mask excluded) is reshaped before
use, in float64:
  * temperature tau: x_tau[v] proportional to x_theta[v] ** (1 / tau), i.e.
    softmax(logits / tau) over the non-mask vocabulary;
  * nucleus top_p (applied after the temperature): sort x_tau descending and keep a
    token iff the mass of the tokens ranked strictly above it is < top_p (the
    smallest prefix with mass >= top_p; the top token is always kept), then
    renormalise. top_p = 1 keeps everything.
All categorical draws use float64 probabilities and float64 uniforms from the
``generator`` by exact inverse-CDF (no fp32 Gumbel truncation, Zheng et al. 2024).
Every step draws the same two (B, L) uniform tensors whatever happens, so samplers
that agree in distribution share one random stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .objective import Denoiser, log_probs_without_mask
from .schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddpm_cache", "analytic")


@dataclass
class SamplerConfig:
    """How to sample. ``validate()`` (run on construction and by every sampler)
    raises one clear ValueError per bad field."""

    sampler: str = "ddpm"
    steps: int = 1000
    t_min: float = 1e-5
    temperature: float = 1.0
    top_p: float = 1.0
    time_conditioned: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: choose one of "
                             f"{', '.join(SAMPLERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {self.t_min!r}")
        if not 0.0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature!r} "
                             f"(for greedy decoding use a small value such as 1e-4)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.sampler == "ddpm_cache" and self.time_conditioned:
            raise ValueError(
                "sampler 'ddpm_cache' reuses the previous network output when a step "
                "changed no token, which is exact only if the output depends on z_t "
                "alone; a time-conditioned model also reads sigma(t), which changes every "
                "step. Use sampler='ddpm' (or 'analytic') for time-conditioned models.")


@dataclass
class SampleResult:
    """``tokens`` (B, L') without any mask; ``scores`` (B, L') float32: for each
    position the sampler filled, the model's log-probability of its token (x_theta
    from the logits of the call it was drawn from, ``<mask>`` excluded, at temperature
    1 and without top-p), 0 for given tokens; ``network_calls`` denoiser calls made;
    ``row_calls`` rows evaluated over those calls (a call may run a subset of the
    batch); ``steps`` diffusion steps taken; ``history`` (``retain_history=True``
    only): z before the first step, then z after each of the ``steps`` steps."""

    tokens: torch.Tensor
    scores: torch.Tensor
    network_calls: int
    row_calls: int
    steps: int
    history: Optional[List[torch.Tensor]] = None


def denoise_probs(logits: torch.Tensor, mask_index: int, temperature: float = 1.0,
                  top_p: float = 1.0) -> torch.Tensor:
    """float64 x_theta (N, V) from logits: ``<mask>`` gets probability 0 (SUBS rule 1),
    then temperature and nucleus top-p as described in the module docstring."""
    logits = logits.double().index_fill(
        -1, torch.tensor([mask_index], device=logits.device), float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical draw per row of non-negative ``weights`` (N, V) from uniforms
    ``u`` (N,) in [0, 1): the token k with cdf[k-1] <= u * total < cdf[k], in float64.
    A zero-weight token can never be drawn."""
    w = weights.double()
    cdf = w.cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last_positive = w.size(-1) - 1 - (w.flip(-1) > 0).long().argmax(-1)
    return torch.minimum(idx, last_positive)   # guards a rounding of u * total up to total


def sample_categorical(probs: torch.Tensor, generator: Optional[torch.Generator] = None):
    """One float64 inverse-CDF draw per row of ``probs`` (N, V)."""
    u = torch.rand(probs.size(0), dtype=torch.float64, device=probs.device, generator=generator)
    return inverse_cdf(probs, u)


def _transition(sampler: str, schedule: NoiseSchedule, x: torch.Tensor,
                t: torch.Tensor, s: torch.Tensor):
    """For masked positions with clean-token distribution ``x`` (N, V), the step t -> s:
    returns (probability of leaving the mask (N,), unnormalised token weights (N, V)).

    ddpm (the exact posterior, mixed over x_theta):
        p(z_s = v | z_t = m) = (alpha_s - alpha_t) / (1 - alpha_t) * x[v],
        p(z_s = m | z_t = m) = (1 - alpha_s) / (1 - alpha_t).

    analytic (SEDD's Tweedie tau-leaping, absorbing graph). The concrete score of a
    masked position is the ratio r[v] = p_t(z with v in place of m) / p_t(z)
    = alpha_t / (1 - alpha_t) * x[v] = x[v] / expm1(sigma_t) for v != m, r[m] = 1.
    Over the interval, d = sigma_t - sigma_s, the forward kernel takes a token v to m
    w.p. 1 - e^{-d} and keeps m w.p. 1. Tweedie's formula
        p(z_s = y | z_t = m) = stag[y] * q_{s->t}(m | y),
    with SEDD's staggered score for the absorbing graph stag[v] = e^d r[v] (v != m),
    stag[m] = 1 + (1 - e^d) sum_{v != m} r[v], gives
        p(z_s = v | z_t = m) = e^d r[v] (1 - e^{-d}) = expm1(d) r[v],
        p(z_s = m | z_t = m) = 1 - expm1(d) / expm1(sigma_t).
    The latter equals e^d (e^{sigma_s} - 1) / (e^{sigma_t} - 1)
    = (1 - alpha_s) / (1 - alpha_t): for the absorbing process under SUBS the
    analytic sampler is exactly the ddpm kernel, computed through the score. (The
    stay probability is not exp(-d): that is the forward probability that a clean
    token at s is still clean at t.)
    """
    if sampler == "analytic":
        sigma_t, sigma_s = schedule.sigma(t), schedule.sigma(s)
        jump = torch.expm1(sigma_t - sigma_s) * (x / torch.expm1(sigma_t))
        return jump.sum(-1), jump
    stay = schedule.mask_prob(s) / schedule.mask_prob(t)
    return (1.0 - stay).expand(x.size(0)), x


class _RowCache:
    """The network's output at the masked positions of every row, reused for the rows
    whose tokens did not change since it was computed.

    A model without time conditioning gives the same x_theta for the same z_t, so a
    row that no step has changed needs no new call (``ddpm_cache``); the other
    samplers invalidate every row after every step. Entries are kept row-major over
    the masked positions, the order of ``z[masked]``; a valid row's masked positions
    are the same as when it was computed, so its entries stay in place."""

    def __init__(self, batch: int, device):
        self.valid = torch.zeros(batch, dtype=torch.bool, device=device)
        self.owner = self.logits = self.x = None

    def lookup(self, masked: torch.Tensor, compute):
        """(logits, x) at every masked position; ``compute(rows)`` runs the network on
        the rows (a 1-D index tensor) that are masked and not valid, if any."""
        owner = masked.nonzero()[:, 0]
        need = masked.any(1) & ~self.valid
        if bool(need.any()):
            fresh_logits, fresh_x = compute(need.nonzero().squeeze(1))
            if self.owner is None or not bool(self.valid.any()):
                logits, x = fresh_logits, fresh_x
            else:
                from_fresh = need[owner]
                keep = self.valid[self.owner]
                logits = fresh_logits.new_empty((owner.numel(), fresh_logits.size(-1)))
                x = fresh_x.new_empty((owner.numel(), fresh_x.size(-1)))
                logits[from_fresh], x[from_fresh] = fresh_logits, fresh_x
                logits[~from_fresh], x[~from_fresh] = self.logits[keep], self.x[keep]
        else:
            keep = self.valid[self.owner]
            logits, x = self.logits[keep], self.x[keep]
        self.owner, self.logits, self.x = owner, logits, x
        self.valid = masked.any(1)
        return logits, x

    def invalidate(self, rows: torch.Tensor) -> None:
        self.valid &= ~rows


def _token_scores(logits: torch.Tensor, tokens: torch.Tensor, mask_index: int) -> torch.Tensor:
    """log x_theta[token] at temperature 1 (``<mask>`` excluded), float32."""
    lp = log_probs_without_mask(logits.float(), mask_index)
    return lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(denoiser: Denoiser, z: torch.Tensor, config: SamplerConfig,
           schedule: NoiseSchedule, mask_index: int,
           generator: Optional[torch.Generator] = None,
           retain_history: bool = False) -> SampleResult:
    """Fill every ``mask_index`` position of ``z`` (B, L); other tokens are kept.

    ``generator`` (on z's device) makes the result reproducible: the same seed gives
    the same samples, and ddpm, ddpm_cache and analytic consume the same stream.
    ``ddpm_cache`` calls the network only for the rows that changed since their
    last call (per row, so its saving does not shrink with the batch size).
    """
    config.validate()
    if z.dim() != 2:
        raise ValueError(f"z must be a (batch, length) tensor, got shape {tuple(z.shape)}")
    z = z.clone()
    B, L = z.shape
    device = z.device
    ts = torch.linspace(1.0, config.t_min, config.steps + 1, dtype=torch.float64)
    calls = row_calls = 0
    cache = _RowCache(B, device)
    scores = torch.zeros(B, L, dtype=torch.float, device=device)
    history = [z.clone()] if retain_history else None

    def network(t, masked):
        def compute(rows):
            nonlocal calls, row_calls
            calls, row_calls = calls + 1, row_calls + rows.numel()
            sigma = schedule.sigma(t).float().to(device).expand(rows.numel())
            logits = denoiser(z[rows], sigma, masked[rows])
            return logits, denoise_probs(logits, mask_index, config.temperature, config.top_p)
        return cache.lookup(masked, compute)

    for k in range(config.steps):
        t, s = ts[k], ts[k + 1]
        u_move = torch.rand(B, L, dtype=torch.float64, device=device, generator=generator)
        u_token = torch.rand(B, L, dtype=torch.float64, device=device, generator=generator)
        masked = z == mask_index
        if bool(masked.any()):
            logits, x = network(t, masked)
            move, weights = _transition(config.sampler, schedule, x, t.to(device), s.to(device))
            leave = u_move[masked] < move
            # tokens are drawn only where a position leaves the mask: the same values
            # as drawing everywhere, without the float64 work for the others
            new = torch.full_like(leave, mask_index, dtype=torch.long)
            new[leave] = inverse_cdf(weights[leave], u_token[masked][leave])
            new_scores = scores[masked]
            new_scores[leave] = _token_scores(logits[leave], new[leave], mask_index)
            z[masked], scores[masked] = new, new_scores
            if config.sampler == "ddpm_cache":
                changed = torch.zeros_like(masked)
                changed[masked] = leave
                cache.invalidate(changed.any(1))
            else:
                cache.invalidate(torch.ones(B, dtype=torch.bool, device=device))
        if retain_history:
            history.append(z.clone())

    masked = z == mask_index
    if bool(masked.any()):
        logits, x = network(ts[-1], masked)
        fill = x.argmax(-1)
        z[masked], scores[masked] = fill, _token_scores(logits, fill, mask_index)
    return SampleResult(tokens=z, scores=scores, network_calls=calls, row_calls=row_calls,
                        steps=config.steps, history=history)


@torch.no_grad()
def sample_semi_ar(denoiser: Denoiser, prefix_tokens: Optional[torch.Tensor],
                   total_length: int, window: int, stride: int, config: SamplerConfig,
                   schedule: NoiseSchedule, mask_index: int,
                   generator: Optional[torch.Generator] = None, *,
                   batch_size: int = 1, device=None) -> SampleResult:
    """Semi-autoregressive generation of exactly ``total_length`` tokens per row.

    The first window holds the prompt (``prefix_tokens`` (B, P), or nothing: then
    ``batch_size`` rows on ``device``) followed by masks up to ``window`` tokens and is
    sampled with ``sample``. Each later window is the last ``window - stride`` tokens
    generated so far (fixed, SUBS copies them) plus ``stride`` masks; its new tokens
    are appended. A prompt of ``window`` tokens or more skips the first window. The
    prompt is returned unchanged (score 0); ``network_calls``, ``row_calls`` and
    ``steps`` add up all windows.
    """
    if window < 1:
        raise ValueError(f"window (the model length) must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if total_length < 1:
        raise ValueError(f"total_length must be >= 1, got {total_length}")
    if prefix_tokens is None:
        prefix_tokens = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    if prefix_tokens.dim() != 2:
        raise ValueError(f"prefix_tokens must be (batch, length), got {tuple(prefix_tokens.shape)}")
    if prefix_tokens.size(1) > total_length:
        raise ValueError(f"the prompt has {prefix_tokens.size(1)} tokens, more than "
                         f"total_length={total_length}")
    if bool((prefix_tokens == mask_index).any()):
        raise ValueError("prefix_tokens contains mask_index; for infilling call sample() "
                         "with a partly masked z")

    def fill(ctx: torch.Tensor) -> None:
        nonlocal tokens, scores, calls, row_calls, steps
        z = torch.cat([ctx, ctx.new_full((ctx.size(0), window - ctx.size(1)), mask_index)], 1)
        out = sample(denoiser, z, config, schedule, mask_index, generator)
        calls, row_calls = calls + out.network_calls, row_calls + out.row_calls
        steps += out.steps
        tokens = torch.cat([tokens, out.tokens[:, ctx.size(1):]], 1)
        scores = torch.cat([scores, out.scores[:, ctx.size(1):]], 1)

    calls = row_calls = steps = 0
    tokens = prefix_tokens.long()
    scores = torch.zeros(tokens.shape, dtype=torch.float, device=tokens.device)
    if tokens.size(1) < window:
        fill(tokens)
    keep = window - stride
    while tokens.size(1) < total_length:
        fill(tokens[:, tokens.size(1) - keep:])
    return SampleResult(tokens=tokens[:, :total_length], scores=scores[:, :total_length],
                        network_calls=calls, row_calls=row_calls, steps=steps)


def unigram_entropy(tokens: torch.Tensor, ignore: Sequence[int] = ()) -> float:
    """Mean over rows of the entropy (nats) of each row's empirical token distribution,
    tokens in ``ignore`` (e.g. pad, eos) left out; rows with no token left are skipped."""
    entropies = []
    for row in tokens.reshape(-1, tokens.size(-1)):
        for i in ignore:
            row = row[row != i]
        if row.numel():
            p = torch.unique(row, return_counts=True)[1].double() / row.numel()
            entropies.append(float(-(p * p.log()).sum()))
    return sum(entropies) / len(entropies) if entropies else 0.0
