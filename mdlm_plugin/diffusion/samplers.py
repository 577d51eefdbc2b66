"""Samplers for masked diffusion language models (MDLM). Pure torch.

The network is reached only through the denoiser convention of ``objective.py``:
``denoiser(z_t, sigma, positions) -> logits`` (N, V) for the selected positions,
row-major. The samplers always ask for exactly the currently masked positions.

Every sampler is a small step rule (:class:`StepRule`, as diffusers' schedulers:
the caller owns the loop): ``sample`` runs the shared loop over a time grid
t_0 = 1 > t_1 > ... > t_T = t_min (``torch.linspace(1, t_min, steps + 1)``), with the
network behind a per-row cache, the random stream, scores, history and counters, and
asks the rule for the tokens after each step: ``Ancestral`` (ddpm, ddpm_cache,
analytic), ``FirstHitting``, ``ReMDM``, ``Confidence``. A given token (prompt, infill
context) is never touched; apart from ReMDM's remasking, a token unmasked at an
earlier step is kept too (the SUBS carry-over rule). After the last step any
``<mask>`` left is replaced by the argmax of x_theta, so the output never contains
``mask_index``.

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
The ancestral rules and ReMDM draw the same two (B, L) uniform tensors every step
whatever happens, so samplers that agree in distribution share one random stream.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .objective import Denoiser, log_probs_without_mask
from .schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddpm_cache", "analytic", "first_hitting", "remdm", "confidence")
# samplers that reuse a row's network output while the row's tokens do not change:
# exact only for a model that reads z_t alone (no time conditioning)
REUSING_SAMPLERS = ("ddpm_cache", "first_hitting")
REMDM_STRATEGIES = ("cap", "rescale", "conf")
COMMIT_SCHEDULES = ("cosine", "linear")


class SamplerError(ValueError):
    """A bad :class:`SamplerConfig` field; ``field`` names it, so an adapter can name
    the flag the user set (the message alone is for people)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_count(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


@dataclass
class SamplerConfig:
    """How to sample. ``validate()`` (run on construction and by every sampler)
    raises one :class:`SamplerError` per bad field.

    ReMDM (Wang et al. 2025): ``remdm_strategy`` cap / rescale / conf with ``remdm_eta``;
    ``remdm_loop`` remasks only while t is in [t_off, t_on), at alpha held at
    ``remdm_alpha_on`` (plain steps before and after). Confidence-ordered (MaskGIT):
    ``commit_schedule`` cosine / linear over ``steps``, or ``commit_per_step`` K > 0
    positions per step; ``confidence_noise`` scales Gumbel noise on the confidence."""

    sampler: str = "ddpm"
    steps: int = 1000
    t_min: float = 1e-5
    temperature: float = 1.0
    top_p: float = 1.0
    time_conditioned: bool = False
    remdm_strategy: str = "cap"
    remdm_eta: float = 0.02
    remdm_loop: bool = False
    remdm_t_on: float = 0.55
    remdm_t_off: float = 0.05
    remdm_alpha_on: float = 0.9
    commit_schedule: str = "cosine"
    commit_per_step: int = 0
    confidence_noise: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for field, bad, message in self._rules():
            if bad:
                raise SamplerError(field, message)

    def _rules(self):
        """(field, is it bad, what to say): each rule is checked here only."""
        yield ("sampler", self.sampler not in SAMPLERS,
               f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        yield ("steps", not _is_count(self.steps, 1),
               f"steps must be a positive integer, got {self.steps!r}")
        yield ("t_min", not 0.0 <= self.t_min < 1.0, f"t_min must be in [0, 1), got {self.t_min!r}")
        yield ("temperature", not 0.0 < self.temperature < float("inf"),
               f"temperature must be > 0 and finite, got {self.temperature!r} (for greedy "
               f"decoding use a small value such as 1e-4)")
        yield ("top_p", not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        yield ("sampler", self.sampler in REUSING_SAMPLERS and self.time_conditioned,
               f"sampler {self.sampler!r} needs a model without time conditioning: it reuses "
               f"a row's network output while the row's tokens do not change, but a "
               f"time-conditioned model also reads sigma(t), which changes every step. Use "
               f"sampler 'ddpm' (or 'analytic') for time-conditioned models")
        yield ("remdm_strategy", self.remdm_strategy not in REMDM_STRATEGIES,
               f"unknown ReMDM strategy {self.remdm_strategy!r}: choose one of "
               f"{', '.join(REMDM_STRATEGIES)}")
        yield ("remdm_eta", not 0.0 <= self.remdm_eta < float("inf"),
               f"the ReMDM eta must be >= 0 and finite, got {self.remdm_eta!r}")
        yield ("remdm_t_on", not 0.0 < self.remdm_t_on <= 1.0,
               f"the ReMDM t_on must be in (0, 1], got {self.remdm_t_on!r}")
        yield ("remdm_t_off", not 0.0 <= self.remdm_t_off < self.remdm_t_on,
               f"the ReMDM t_off must be in [0, t_on = {self.remdm_t_on!r}), got "
               f"{self.remdm_t_off!r}: the loop remasks while t_off <= t < t_on")
        yield ("remdm_alpha_on", not 0.0 < self.remdm_alpha_on < 1.0,
               f"the ReMDM alpha_on must be in (0, 1), got {self.remdm_alpha_on!r}")
        yield ("commit_schedule", self.commit_schedule not in COMMIT_SCHEDULES,
               f"unknown commit schedule {self.commit_schedule!r}: choose one of "
               f"{', '.join(COMMIT_SCHEDULES)}")
        yield ("commit_per_step", not _is_count(self.commit_per_step, 0),
               f"commit_per_step must be an integer >= 0 (0: the commit schedule), got "
               f"{self.commit_per_step!r}")
        yield ("confidence_noise", not 0.0 <= self.confidence_noise < float("inf"),
               f"confidence_noise must be >= 0 and finite, got {self.confidence_noise!r}")


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
        # t, s: scalars, or one time per row of x (N,) (distillation's per-row times)
        sigma_t, sigma_s = schedule.sigma(t).reshape(-1, 1), schedule.sigma(s).reshape(-1, 1)
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


@dataclass
class StepContext:
    """What a step rule sees at step ``k`` (t -> s): the tokens ``z`` (B, L) (not to be
    modified: a rule returns new ones), ``masked`` = z == mask, the network's ``logits``
    and float64 clean-token distribution ``x`` (temperature, top-p) at the masked
    positions (row-major, N rows), ``given`` (the input's tokens: never change),
    ``scores`` (the log-probability each token had when it was drawn), and the random
    stream (``uniforms``). ``t`` and ``s`` are scalars in the sampling loop; the
    ancestral rule also takes one time per masked position (N,) (``sdtt.py``)."""

    k: int
    t: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    masked: torch.Tensor
    given: torch.Tensor
    logits: Optional[torch.Tensor]
    x: Optional[torch.Tensor]
    scores: torch.Tensor
    mask_index: int
    schedule: NoiseSchedule
    generator: Optional[torch.Generator]

    def uniforms(self, *shape) -> torch.Tensor:
        """float64 uniforms in [0, 1), (B, L) unless a shape is given."""
        return torch.rand(shape or self.z.shape, dtype=torch.float64, device=self.z.device,
                          generator=self.generator)


class StepRule(abc.ABC):
    """One sampler: ``start`` sees the input and returns the number of steps; ``step``
    returns the tokens after step k. The shared loop (``sample``) owns the network and
    its per-row cache, the random stream, scores, history and counters."""

    reuses_outputs = False    # a row's network output is reused while its tokens stay

    def __init__(self, config: SamplerConfig):
        self.config = config

    def start(self, z: torch.Tensor, mask_index: int) -> int:
        return self.config.steps

    @abc.abstractmethod
    def step(self, ctx: StepContext) -> torch.Tensor:
        """The tokens after this step (a new tensor)."""


class Ancestral(StepRule):
    """ddpm / ddpm_cache / analytic: each masked position leaves the mask with the
    kernel's probability (``_transition``) and then takes a token drawn from its
    weights. Two (B, L) uniform tensors per step, whatever happens."""

    def __init__(self, config):
        super().__init__(config)
        self.reuses_outputs = config.sampler == "ddpm_cache"
        self.kernel = "analytic" if config.sampler == "analytic" else "ddpm"

    def step(self, ctx):
        u_move, u_token = ctx.uniforms(), ctx.uniforms()
        if ctx.x is None:
            return ctx.z
        move, weights = _transition(self.kernel, ctx.schedule, ctx.x, ctx.t, ctx.s)
        leave = u_move[ctx.masked] < move
        # tokens are drawn only where a position leaves the mask: the same values as
        # drawing everywhere, without the float64 work for the others
        new = torch.full_like(leave, ctx.mask_index, dtype=torch.long)
        new[leave] = inverse_cdf(weights[leave], u_token[ctx.masked][leave])
        z = ctx.z.clone()
        z[ctx.masked] = new
        return z


def _entry_index(masked: torch.Tensor) -> torch.Tensor:
    """(B, L): the row of ``x``/``logits`` that holds each masked position, -1 elsewhere."""
    index = torch.full(masked.shape, -1, dtype=torch.long, device=masked.device)
    index[masked] = torch.arange(int(masked.sum()), device=masked.device)
    return index


class FirstHitting(StepRule):
    """First-hitting sampler (Zheng et al. 2024). With n masked positions the next
    time one of them unmasks is tau = alpha^-1(1 - (1 - alpha_t) u^(1/n)); which one is
    uniform, and its token is drawn from x_theta. A model without time conditioning
    does not read tau, so a step unmasks one uniformly chosen position of every row
    that has one: exact, and as many steps as the row has masks (each a network call
    for that row only, through the per-row cache)."""

    reuses_outputs = True

    def start(self, z, mask_index):
        return int((z == mask_index).sum(1).max()) if z.numel() else 0

    def step(self, ctx):
        u_position, u_token = ctx.uniforms(ctx.z.size(0)), ctx.uniforms(ctx.z.size(0))
        rows = ctx.masked.any(1)
        if ctx.x is None or not bool(rows.any()):
            return ctx.z
        position = inverse_cdf(ctx.masked[rows].double(), u_position[rows])
        entry = _entry_index(ctx.masked)[rows, position]
        z = ctx.z.clone()
        z[rows.nonzero().squeeze(1), position] = inverse_cdf(ctx.x[entry], u_token[rows])
        return z


class Confidence(StepRule):
    """Confidence-ordered (MaskGIT; mask-predict; LLaDA's low-confidence remasking):
    a token is drawn at every masked position, and each row commits the k_r most
    confident (the probability of the drawn token, plus ``confidence_noise`` times
    Gumbel noise); the others stay masked. k_r follows the commit schedule, so the row
    is complete after ``steps``: cosine keeps floor(n_r cos(pi/2 (k+1)/T)) masked after
    step k, linear floor(n_r (1 - (k+1)/T)); ``commit_per_step`` K commits K a step."""

    def start(self, z, mask_index):
        self.n = (z == mask_index).sum(1)
        per_step, steps = self.config.commit_per_step, self.config.steps
        if per_step and bool((self.n > per_step * steps).any()):
            raise SamplerError(
                "commit_per_step",
                f"the commit schedule does not finish: {per_step} positions per step x "
                f"{steps} steps < {int(self.n.max())} masked positions of a row; raise "
                f"steps or commit_per_step (or use 0: the schedule over the steps)")
        return steps

    def left_masked(self, k: int) -> torch.Tensor:
        cfg, n = self.config, self.n.double()
        if cfg.commit_per_step:
            return (self.n - cfg.commit_per_step * (k + 1)).clamp(min=0)
        frac = (k + 1) / cfg.steps
        keep = n * (math.cos(math.pi / 2 * frac) if cfg.commit_schedule == "cosine" else 1 - frac)
        return torch.zeros_like(self.n) if k + 1 == cfg.steps else keep.floor().long()

    def step(self, ctx):
        u_token = ctx.uniforms()
        u_noise = ctx.uniforms() if self.config.confidence_noise > 0 else None
        if ctx.x is None:
            return ctx.z
        drawn = inverse_cdf(ctx.x, u_token[ctx.masked])
        conf = torch.full(ctx.z.shape, float("-inf"), dtype=torch.float64, device=ctx.z.device)
        conf[ctx.masked] = ctx.x.gather(-1, drawn.unsqueeze(-1)).squeeze(-1).log()
        if u_noise is not None:
            gumbel = -torch.log(-torch.log(u_noise.clamp_min(1e-300)))
            conf[ctx.masked] += self.config.confidence_noise * gumbel[ctx.masked]
        commit = ctx.masked.sum(1) - self.left_masked(ctx.k)
        rank = conf.argsort(1, descending=True).argsort(1)
        chosen = (rank < commit.unsqueeze(1)) & ctx.masked
        z = ctx.z.clone()
        z[chosen] = drawn[chosen[ctx.masked]]
        return z


class ReMDM(StepRule):
    """ReMDM (Wang et al. 2025): the ddpm step, plus a decoded token (not a given one)
    is masked again with probability sigma_t:
        decoded x:  Cat((1 - sigma) x + sigma m)
        masked:     Cat(((alpha_s - (1 - sigma) alpha_t) x_theta
                         + (1 - alpha_s - sigma alpha_t) m) / (1 - alpha_t)),
    sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t). Strategies: cap
    min(eta, sigma_max); rescale eta sigma_max; conf sigma_max softmax(-psi) over the
    row's decoded tokens, psi the probability a token had when drawn (masked positions
    then take the ddpm step, sigma = 0). With ``remdm_loop`` alpha runs from alpha(1) to
    alpha_on until t_on, is held there (only remasking moves) until t_off, then runs to
    1; remasking happens only in the held phase. eta = 0 is the ddpm step, bit for bit."""

    def alphas(self, ctx):
        """(alpha_t, alpha_s, 1 - alpha_t, 1 - alpha_s, remask in this step)."""
        sch, cfg, t, s = ctx.schedule, self.config, ctx.t, ctx.s
        if not cfg.remdm_loop:
            return sch.alpha(t), sch.alpha(s), sch.mask_prob(t), sch.mask_prob(s), True
        a_one, a_zero = sch.alpha(torch.ones_like(t)), sch.alpha(torch.zeros_like(t))
        t_on, t_off, a_on = cfg.remdm_t_on, cfg.remdm_t_off, cfg.remdm_alpha_on

        def alpha(u):
            if u >= t_on:
                return a_one + (a_on - a_one) * (1 - u) / max(1 - t_on, 1e-12)
            if u >= t_off:
                return torch.full_like(t, a_on)
            return a_on + (a_zero - a_on) * (t_off - u) / t_off

        a_t, a_s = alpha(float(t)), alpha(float(s))
        return a_t, a_s, 1 - a_t, 1 - a_s, t_off <= float(t) < t_on

    def sigmas(self, ctx, a_t, m_s, decoded):
        """(sigma at each decoded position (B, L), sigma for the masked positions)."""
        cfg = self.config
        sigma_max = torch.clamp(m_s / a_t, max=1.0)
        if cfg.remdm_strategy == "conf":
            psi = ctx.scores.double().exp().masked_fill(~decoded, float("inf"))
            weight = torch.softmax(-psi, dim=1).nan_to_num(0.0)   # rows with none decoded
            return sigma_max * weight, torch.zeros_like(sigma_max)
        sigma = torch.clamp(sigma_max, max=cfg.remdm_eta) if cfg.remdm_strategy == "cap" \
            else cfg.remdm_eta * sigma_max
        return sigma.expand(ctx.z.shape), sigma

    def step(self, ctx):
        u_move, u_token = ctx.uniforms(), ctx.uniforms()
        a_t, a_s, m_t, m_s, remask = self.alphas(ctx)
        decoded = ~ctx.masked & ~ctx.given
        sigma_decoded, sigma_masked = self.sigmas(ctx, a_t, m_s, decoded)
        if not remask:
            sigma_decoded, sigma_masked = torch.zeros_like(sigma_decoded), 0.0 * sigma_masked
        z = ctx.z.clone()
        z[decoded & (u_move < sigma_decoded)] = ctx.mask_index
        if ctx.x is not None:
            stay = (m_s - sigma_masked * a_t) / m_t
            leave = u_move[ctx.masked] < (1.0 - stay)
            new = torch.full_like(leave, ctx.mask_index, dtype=torch.long)
            new[leave] = inverse_cdf(ctx.x[leave], u_token[ctx.masked][leave])
            z[ctx.masked] = new
        return z


RULES = {"ddpm": Ancestral, "ddpm_cache": Ancestral, "analytic": Ancestral,
         "first_hitting": FirstHitting, "remdm": ReMDM, "confidence": Confidence}


@torch.no_grad()
def sample(denoiser: Denoiser, z: torch.Tensor, config: SamplerConfig,
           schedule: NoiseSchedule, mask_index: int,
           generator: Optional[torch.Generator] = None,
           retain_history: bool = False, row_indexed: bool = False) -> SampleResult:
    """Fill every ``mask_index`` position of ``z`` (B, L); other tokens are kept.

    The loop every sampler shares: the network (through the per-row cache), the
    random stream, scores, history and counters; the sampler's ``step`` rule decides
    the next tokens. ``generator`` (on z's device) makes the result reproducible:
    ddpm, ddpm_cache, analytic and remdm with eta = 0 consume the same stream. A
    rule that ``reuses_outputs`` calls the network only for the rows that changed
    since their last call (per row, so its saving does not shrink with the batch).
    ``row_indexed``: the denoiser also takes the batch rows (1-D index) of each call,
    ``denoiser(z_rows, sigma, positions, rows)``, for per-row state (block diffusion's
    key/value cache).
    """
    config.validate()
    if z.dim() != 2:
        raise ValueError(f"z must be a (batch, length) tensor, got shape {tuple(z.shape)}")
    z = z.clone()
    B, L = z.shape
    device = z.device
    rule = RULES[config.sampler](config)
    steps = rule.start(z, mask_index)
    ts = torch.linspace(1.0, config.t_min, steps + 1, dtype=torch.float64)
    given = z != mask_index
    calls = row_calls = 0
    cache = _RowCache(B, device)
    scores = torch.zeros(B, L, dtype=torch.float, device=device)
    history = [z.clone()] if retain_history else None

    def network(t, masked):
        def compute(rows):
            nonlocal calls, row_calls
            calls, row_calls = calls + 1, row_calls + rows.numel()
            sigma = schedule.sigma(t).float().to(device).expand(rows.numel())
            extra = (rows,) if row_indexed else ()
            logits = denoiser(z[rows], sigma, masked[rows], *extra)
            return logits, denoise_probs(logits, mask_index, config.temperature, config.top_p)
        return cache.lookup(masked, compute)

    for k in range(steps):
        masked = z == mask_index
        logits, x = network(ts[k], masked) if bool(masked.any()) else (None, None)
        new = rule.step(StepContext(k, ts[k].to(device), ts[k + 1].to(device), z, masked,
                                    given, logits, x, scores, mask_index, schedule, generator))
        drawn = masked & (new != mask_index)
        if bool(drawn.any()):
            scores[drawn] = _token_scores(logits[drawn[masked]], new[drawn], mask_index)
        scores[~masked & (new == mask_index)] = 0.0          # masked again (remdm)
        changed = (new != z).any(1)
        cache.invalidate(changed if rule.reuses_outputs else torch.ones_like(changed))
        z = new
        if retain_history:
            history.append(z.clone())

    masked = z == mask_index
    if bool(masked.any()):
        logits, x = network(ts[-1], masked)
        fill = x.argmax(-1)
        z[masked], scores[masked] = fill, _token_scores(logits, fill, mask_index)
    return SampleResult(tokens=z, scores=scores, network_calls=calls, row_calls=row_calls,
                        steps=steps, history=history)


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


def repeated_ngram_share(tokens: torch.Tensor, n: int = 4, ignore: Sequence[int] = ()) -> float:
    """Mean over rows of the share of a row's n-grams that repeat an earlier one of the
    row ((count - distinct) / count; 0: no repetition), tokens in ``ignore`` left out
    first; rows with fewer than n tokens left are skipped."""
    shares = []
    for row in tokens.reshape(-1, tokens.size(-1)):
        for i in ignore:
            row = row[row != i]
        if row.numel() >= n:
            grams = row.unfold(0, n, 1)
            shares.append(1.0 - torch.unique(grams, dim=0).size(0) / grams.size(0))
    return sum(shares) / len(shares) if shares else 0.0
