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
  * nucleus top_p (applied after the temperature), the reference repositories'
    convention (kuleshov-group/remdm, bd3lms): sort x_tau descending and keep a
    token iff the cumulative mass up to and including it is <= top_p, and always the
    top token; then renormalise. With (.5, .3, .15, .05) and top_p = 0.9 it samples
    from (.625, .375, 0, 0). top_p = 1 keeps everything.
All categorical draws use float64 probabilities and float64 uniforms from the
``generator`` by exact inverse-CDF (no fp32 Gumbel truncation, Zheng et al. 2024).
The ancestral rules and ReMDM draw the same two (B, L) uniform tensors every step
whatever happens, so samplers that agree in distribution share one random stream.

A step costs what it changes: a rule first decides which positions leave the mask
(for ddpm, analytic and ReMDM that does not depend on x_theta), and the float64
distribution is computed only where a token is drawn (``StepContext.draw``; the
confidence sampler draws everywhere). ``SampleResult.prob_rows`` counts them. A
denoiser may return :class:`DeferredLogits` instead of logits (a model's last hidden
states, with its output layer run on demand; the MDLM's ``sampling_denoiser`` and block
sampling's ``CachedBlocks`` do): then the output layer, too, runs only where a token is
drawn, once per position and step (the drawn tokens' scores reuse those logits). The
DiT's ``OutputRows`` give each position the logits a call over every masked position
gives (bitwise on one thread).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Union

import torch

from .objective import Denoiser, log_probs_without_mask, without_symbol
from .schedules import NoiseSchedule

SAMPLERS = ("ddpm", "ddpm_cache", "analytic", "first_hitting", "remdm", "confidence")
# samplers that reuse a row's network output while the row's tokens do not change:
# exact only for a model that reads z_t alone (no time conditioning)
REUSING_SAMPLERS = ("ddpm_cache", "first_hitting")
REMDM_STRATEGIES = ("cap", "rescale", "conf")
# eta of the reference scripts (kuleshov-group/remdm scripts/remdm-{cap,rescale,loop}.sh,
# all with nucleus p = 0.9 and T = 1024): the default when ``remdm_eta`` is None
REMDM_REFERENCE_ETA = {"cap": 0.008, "rescale": 0.015, "loop": 0.02}
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

    ReMDM (Wang et al. 2025): ``remdm_strategy`` cap / rescale / conf with ``remdm_eta``
    (None: the reference script's eta, ``REMDM_REFERENCE_ETA``); ``remdm_loop``
    remasks with sigma = eta only while t_off < t <= t_on, at alpha held at
    ``remdm_alpha_on`` (plain steps before and after): the reference's remdm-loop,
    which takes no strategy. Confidence-ordered (MaskGIT): ``commit_schedule`` cosine
    / linear over ``steps``, or ``commit_per_step`` K > 0 positions per step;
    ``confidence_noise`` scales Gumbel noise on the confidence, annealed by
    (1 - (k + 1) / steps) as MaskGIT's choice temperature."""

    sampler: str = "ddpm"
    steps: int = 1000
    t_min: float = 1e-5
    temperature: float = 1.0
    top_p: float = 1.0
    time_conditioned: bool = False
    remdm_strategy: str = "cap"
    remdm_eta: Optional[float] = None
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
        yield ("remdm_eta", self.remdm_eta is not None and not 0.0 <= self.remdm_eta < float("inf"),
               f"the ReMDM eta must be >= 0 and finite, got {self.remdm_eta!r}")
        yield ("remdm_strategy", self.remdm_loop and self.remdm_strategy != "cap",
               f"the ReMDM loop remasks with sigma = eta in its held phase (the reference's "
               f"remdm-loop) and takes no strategy: leave remdm_strategy at 'cap', got "
               f"{self.remdm_strategy!r}")
        yield ("remdm_t_on", not 0.0 < self.remdm_t_on <= 1.0,
               f"the ReMDM t_on must be in (0, 1], got {self.remdm_t_on!r}")
        yield ("remdm_t_off", not 0.0 <= self.remdm_t_off < self.remdm_t_on,
               f"the ReMDM t_off must be in [0, t_on = {self.remdm_t_on!r}), got "
               f"{self.remdm_t_off!r}: the loop remasks while t_off <= t < t_on")
        yield ("remdm_alpha_on", not 0.0 < self.remdm_alpha_on < 1.0,
               f"the ReMDM alpha_on must be in (0, 1), got {self.remdm_alpha_on!r}")
        if self.remdm_loop and 0.0 < self.remdm_alpha_on < 1.0:
            held_max = (1.0 - self.remdm_alpha_on) / self.remdm_alpha_on
            yield ("remdm_eta", self.eta > held_max,
                   f"the ReMDM loop's eta must be <= (1 - alpha_on) / alpha_on = "
                   f"{held_max:.6g} (sigma_max in the held phase), got {self.eta!r}")
        yield ("commit_schedule", self.commit_schedule not in COMMIT_SCHEDULES,
               f"unknown commit schedule {self.commit_schedule!r}: choose one of "
               f"{', '.join(COMMIT_SCHEDULES)}")
        yield ("commit_per_step", not _is_count(self.commit_per_step, 0),
               f"commit_per_step must be an integer >= 0 (0: the commit schedule), got "
               f"{self.commit_per_step!r}")
        yield ("confidence_noise", not 0.0 <= self.confidence_noise < float("inf"),
               f"confidence_noise must be >= 0 and finite, got {self.confidence_noise!r}")


    @property
    def eta(self) -> float:
        """ReMDM's eta: ``remdm_eta``, or the reference script's for the strategy."""
        if self.remdm_eta is not None:
            return self.remdm_eta
        return REMDM_REFERENCE_ETA["loop" if self.remdm_loop else self.remdm_strategy] \
            if (self.remdm_loop or self.remdm_strategy != "conf") else 0.0


@dataclass
class SampleResult:
    """``tokens`` (B, L') without any mask; ``scores`` (B, L') float32: for each
    position the sampler filled, the model's log-probability of its token (x_theta
    from the logits of the call it was drawn from, ``<mask>`` excluded, at temperature
    1 and without top-p), 0 for given tokens; ``network_calls`` denoiser calls made;
    ``row_calls`` rows evaluated over those calls (a call may run a subset of the
    batch); ``steps`` diffusion steps taken; ``history`` (``retain_history=True``
    only): z before the first step, then z after each of the ``steps`` steps;
    ``prob_rows`` positions whose float64 distribution over the vocabulary was
    computed (one per token drawn, all masked positions for the confidence sampler)."""

    tokens: torch.Tensor
    scores: torch.Tensor
    network_calls: int
    row_calls: int
    steps: int
    history: Optional[List[torch.Tensor]] = None
    prob_rows: int = 0


def denoise_probs(logits: torch.Tensor, mask_index: int, temperature: float = 1.0,
                  top_p: float = 1.0) -> torch.Tensor:
    """float64 x_theta (N, V) from logits: ``<mask>`` gets probability 0 (SUBS rule 1),
    then temperature and nucleus top-p as described in the module docstring."""
    logits = without_symbol(logits, mask_index, torch.float64)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep_sorted = sorted_p.cumsum(-1) <= top_p
        keep_sorted[..., 0] = True
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


def _leave_probability(kernel: str, schedule: NoiseSchedule, t: torch.Tensor,
                       s: torch.Tensor) -> torch.Tensor:
    """The probability that a masked position leaves the mask in the step t -> s; a
    position that leaves takes a token drawn from x (x_theta after temperature and
    top-p). It does not depend on x, so a step decides which positions leave first.

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
        p(z_s = m | z_t = m) = 1 - expm1(d) / expm1(sigma_t)
    (sum_v x[v] = 1): the token is drawn from x, and the probability of leaving is
    expm1(d) / expm1(sigma_t). The stay probability equals e^d (e^{sigma_s} - 1) /
    (e^{sigma_t} - 1) = (1 - alpha_s) / (1 - alpha_t): for the absorbing process under
    SUBS the analytic sampler is exactly the ddpm kernel, computed through the score.
    (The stay probability is not exp(-d): that is the forward probability that a
    clean token at s is still clean at t.)
    """
    if kernel == "analytic":
        sigma_t, sigma_s = schedule.sigma(t), schedule.sigma(s)
        return torch.expm1(sigma_t - sigma_s) / torch.expm1(sigma_t)
    return 1.0 - schedule.mask_prob(s) / schedule.mask_prob(t)


class DeferredLogits(Protocol):
    """A denoiser's output whose logits are computed on demand: ``len()`` is the number
    N of positions asked for; ``logits(index)`` gives the logits (n, V) of the positions
    ``index`` (n,) of them (all N when None), each as the whole call would give it."""

    def __len__(self) -> int: ...

    def logits(self, index: Optional[torch.Tensor] = None) -> torch.Tensor: ...


Output = Union[torch.Tensor, DeferredLogits]


def _logits_of(out: Output, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``index`` (all when None) of a denoiser's output, as logits."""
    if isinstance(out, torch.Tensor):
        return out if index is None else out.index_select(0, index)
    return out.logits(index)


class _RowCache:
    """The network's output at the masked positions of every row (logits, or
    :class:`DeferredLogits`), reused for the rows whose tokens did not change since it
    was computed.

    A model without time conditioning gives the same x_theta for the same z_t, so a
    row that no step has changed needs no new call (``ddpm_cache``); the other
    samplers invalidate every row after every step. Each call's output is kept as it
    came (row-major over the called rows' masked positions) and each row remembers
    which output holds it and where its block starts: a step copies nothing, and
    reads only the positions it asks for (``logits``). A valid row's masked
    positions are the same as when it was computed, so a position's entry is the
    block's start plus its rank among the row's masked positions."""

    def __init__(self, batch: int, device):
        self.valid = torch.zeros(batch, dtype=torch.bool, device=device)
        self.output = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)
        self.outputs = {}
        self.calls = 0

    def refresh(self, masked: torch.Tensor, compute) -> None:
        """``compute(rows)`` (logits, row-major over ``masked[rows]``) for the rows (a
        1-D index tensor) that are masked and not valid, if any."""
        need = masked.any(1) & ~self.valid
        if not bool(need.any()):
            return
        rows = need.nonzero().squeeze(1)
        counts = masked[rows].sum(1)
        self.outputs[self.calls] = compute(rows)
        self.output[rows], self.start[rows] = self.calls, counts.cumsum(0) - counts
        self.calls += 1
        self.valid |= need
        live = set(self.output[self.valid].tolist())
        self.outputs = {i: out for i, out in self.outputs.items() if i in live}

    def logits(self, masked: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The logits at ``where`` (B, L) bool, a subset of the masked positions of
        valid rows, row-major (N, V)."""
        rows, cols = where.nonzero(as_tuple=True)
        entry = self.start[rows] + (masked.cumsum(1) - 1)[rows, cols]
        if len(self.outputs) == 1:
            (out,) = self.outputs.values()
            # every position of the one output, in order: the output itself
            return _logits_of(out, None if entry.numel() == len(out) else entry)
        which, got = self.output[rows], None
        for i, out in self.outputs.items():
            sel = which == i
            if bool(sel.any()):
                part = _logits_of(out, entry[sel])
                if got is None:
                    got = part.new_empty((entry.numel(), part.size(-1)))
                got[sel] = part
        return got

    def invalidate(self, rows: torch.Tensor) -> None:
        self.valid &= ~rows


class _StepLogits:
    """The logits of one network evaluation at the positions a step asks for, each
    position's computed once: asked again for a subset of the last positions (the drawn
    tokens' scores), the logits are those rows of the last answer."""

    def __init__(self, cache: _RowCache, masked: torch.Tensor):
        self.cache, self.masked, self.where, self.out = cache, masked, None, None

    def __call__(self, where: torch.Tensor) -> torch.Tensor:
        if self.where is None or bool((where & ~self.where).any()):
            self.where, self.out = where, self.cache.logits(self.masked, where)
            return self.out
        if torch.equal(where, self.where):
            return self.out
        rank = self.where.flatten().cumsum(0) - 1
        return self.out.index_select(0, rank[where.flatten()])


def _token_scores(logits: torch.Tensor, tokens: torch.Tensor, mask_index: int) -> torch.Tensor:
    """log x_theta[token] at temperature 1 (``<mask>`` excluded), float32."""
    lp = log_probs_without_mask(logits.float(), mask_index)
    return lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class StepContext:
    """What a step rule sees at step ``k`` (t -> s): the tokens ``z`` (B, L) (not to be
    modified: a rule returns new ones), ``masked`` = z == mask, ``given`` (the
    input's tokens: never change), ``scores`` (the log-probability each token had
    when it was drawn, temperature 1), ``chance`` (float64: the probability each
    decoded token had under the distribution it was drawn from), the random stream
    (``uniforms``) and the network's float64 clean-token distribution x (temperature,
    top-p) at any masked positions, computed on demand (``probs``, ``draw``)."""

    k: int
    t: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    masked: torch.Tensor
    given: torch.Tensor
    scores: torch.Tensor
    chance: torch.Tensor
    mask_index: int
    schedule: NoiseSchedule
    generator: Optional[torch.Generator]
    probs_at: Callable[[torch.Tensor], torch.Tensor]
    drawn_chance: Optional[torch.Tensor] = None

    def uniforms(self, *shape) -> torch.Tensor:
        """float64 uniforms in [0, 1), (B, L) unless a shape is given."""
        return torch.rand(shape or self.z.shape, dtype=torch.float64, device=self.z.device,
                          generator=self.generator)

    def probs(self, where: torch.Tensor) -> torch.Tensor:
        """float64 x (N, V) at ``where`` (B, L) bool (masked positions), row-major."""
        return self.probs_at(where)

    def draw(self, where: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Tokens (N,) drawn from x at ``where`` with the uniforms ``u`` (N,); each
        token's probability under x is kept (``drawn_chance``) for ``chance``."""
        x = self.probs(where)
        tokens = inverse_cdf(x, u)
        if self.drawn_chance is None:
            self.drawn_chance = torch.zeros(self.z.shape, dtype=torch.float64,
                                            device=self.z.device)
        self.drawn_chance[where] = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens


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
        """The tokens after this step (a new tensor, or ``ctx.z`` when none changes)."""


class Ancestral(StepRule):
    """ddpm / ddpm_cache / analytic: each masked position leaves the mask with the
    kernel's probability (``_leave_probability``) and then takes a token drawn from x.
    Two (B, L) uniform tensors per step, whatever happens."""

    def __init__(self, config):
        super().__init__(config)
        self.reuses_outputs = config.sampler == "ddpm_cache"
        self.kernel = "analytic" if config.sampler == "analytic" else "ddpm"

    def step(self, ctx):
        u_move, u_token = ctx.uniforms(), ctx.uniforms()
        leave = ctx.masked & (u_move < _leave_probability(self.kernel, ctx.schedule,
                                                          ctx.t, ctx.s))
        if not bool(leave.any()):
            return ctx.z
        z = ctx.z.clone()
        z[leave] = ctx.draw(leave, u_token[leave])
        return z


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
        if not bool(rows.any()):
            return ctx.z
        position = inverse_cdf(ctx.masked[rows].double(), u_position[rows])
        chosen = torch.zeros_like(ctx.masked)
        chosen[rows.nonzero().squeeze(1), position] = True
        z = ctx.z.clone()
        z[chosen] = ctx.draw(chosen, u_token[rows])
        return z


class Confidence(StepRule):
    """Confidence-ordered (MaskGIT's parallel decoding; mask-predict; LLaDA's
    low-confidence remasking): a token is drawn at every masked position, and each row
    commits the most confident (the probability of the drawn token, plus
    ``confidence_noise`` (1 - (k + 1)/T) times Gumbel noise: MaskGIT's annealed choice
    temperature); the others stay masked. The number left masked after step k follows
    the commit schedule of the row's n masked positions (cosine floor(n cos(pi/2
    (k+1)/T)), linear floor(n (1 - (k+1)/T)), or n - K (k+1) with ``commit_per_step``
    K; none after the last step), clamped as MaskGIT does to one less than the row's
    masked positions, so every step commits at least one token of every row that has
    one. (MaskGIT also keeps at least one masked until its last step; that would spend
    a network call on a step that commits nothing when T > n, so a row here finishes
    early and is not evaluated again.)"""

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

    def left_masked(self, k: int, masked_now: torch.Tensor) -> torch.Tensor:
        """(B,) positions left masked after step k, for rows with ``masked_now``."""
        cfg, n = self.config, self.n.double()
        if cfg.commit_per_step:
            left = (self.n - cfg.commit_per_step * (k + 1)).clamp(min=0)
        elif k + 1 == cfg.steps:
            left = torch.zeros_like(self.n)
        else:
            frac = (k + 1) / cfg.steps
            left = (n * (math.cos(math.pi / 2 * frac) if cfg.commit_schedule == "cosine"
                         else 1 - frac)).floor().long()
        return torch.minimum(left, (masked_now - 1).clamp(min=0))

    def step(self, ctx):
        u_token = ctx.uniforms()
        u_noise = ctx.uniforms() if self.config.confidence_noise > 0 else None
        if not bool(ctx.masked.any()):
            return ctx.z
        drawn = torch.full_like(ctx.z, ctx.mask_index)
        drawn[ctx.masked] = ctx.draw(ctx.masked, u_token[ctx.masked])
        conf = ctx.drawn_chance.log().masked_fill(~ctx.masked, float("-inf"))
        anneal = self.config.confidence_noise * (1.0 - (ctx.k + 1) / self.config.steps)
        if u_noise is not None and anneal > 0:
            gumbel = -torch.log(-torch.log(u_noise.clamp_min(1e-300)))
            conf = conf + anneal * gumbel.masked_fill(~ctx.masked, 0.0)
        masked_now = ctx.masked.sum(1)
        commit = masked_now - self.left_masked(ctx.k, masked_now)
        rank = conf.argsort(1, descending=True).argsort(1)
        chosen = (rank < commit.unsqueeze(1)) & ctx.masked
        z = ctx.z.clone()
        z[chosen] = drawn[chosen]
        return z


class ReMDM(StepRule):
    """ReMDM (Wang et al. 2025): the ddpm step, plus a decoded token (not a given one)
    is masked again with probability sigma_t:
        decoded x:  Cat((1 - sigma) x + sigma m)
        masked:     Cat(((alpha_s - (1 - sigma) alpha_t) x_theta
                         + (1 - alpha_s - sigma alpha_t) m) / (1 - alpha_t)),
    sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t). Strategies: cap
    min(eta, sigma_max); rescale eta sigma_max; conf sigma_max softmax(-psi) over the
    row's decoded tokens, psi the probability a token had under the distribution it
    was drawn from (after temperature and top-p; masked positions then take the ddpm
    step, sigma = 0). With ``remdm_loop`` alpha runs from alpha(1) to alpha_on until
    t_on, is held there until t_off, then runs to 1; remasking happens only in the
    held phase, t_off < t <= t_on, with sigma = eta (the reference's remdm-loop).
    eta = 0 is the ddpm step, bit for bit."""

    def alphas(self, ctx):
        """(alpha_t, alpha_s, 1 - alpha_t, 1 - alpha_s, in the loop's held phase)."""
        sch, cfg, t, s = ctx.schedule, self.config, ctx.t, ctx.s
        if not cfg.remdm_loop:
            return sch.alpha(t), sch.alpha(s), sch.mask_prob(t), sch.mask_prob(s), False
        a_one, a_zero = sch.alpha(torch.ones_like(t)), sch.alpha(torch.zeros_like(t))
        t_on, t_off, a_on = cfg.remdm_t_on, cfg.remdm_t_off, cfg.remdm_alpha_on

        def alpha(u):
            if u > t_on:
                return a_one + (a_on - a_one) * (1 - u) / max(1 - t_on, 1e-12)
            if u > t_off:
                return torch.full_like(t, a_on)
            return a_on + (a_zero - a_on) * (t_off - u) / t_off

        a_t, a_s = alpha(float(t)), alpha(float(s))
        return a_t, a_s, 1 - a_t, 1 - a_s, t_off < float(t) <= t_on

    def sigmas(self, ctx, a_t, m_s, decoded, held):
        """(sigma at each decoded position (B, L), sigma for the masked positions)."""
        cfg = self.config
        if cfg.remdm_loop:
            sigma = torch.full_like(a_t, cfg.eta if held else 0.0)
            return sigma.expand(ctx.z.shape), sigma
        sigma_max = torch.clamp(m_s / a_t, max=1.0)
        if cfg.remdm_strategy == "conf":
            psi = ctx.chance.masked_fill(~decoded, float("inf"))
            weight = torch.softmax(-psi, dim=1).nan_to_num(0.0)   # rows with none decoded
            return sigma_max * weight, torch.zeros_like(sigma_max)
        sigma = torch.clamp(sigma_max, max=cfg.eta) if cfg.remdm_strategy == "cap" \
            else cfg.eta * sigma_max
        return sigma.expand(ctx.z.shape), sigma

    def step(self, ctx):
        u_move, u_token = ctx.uniforms(), ctx.uniforms()
        a_t, a_s, m_t, m_s, held = self.alphas(ctx)
        decoded = ~ctx.masked & ~ctx.given
        sigma_decoded, sigma_masked = self.sigmas(ctx, a_t, m_s, decoded, held)
        remask = decoded & (u_move < sigma_decoded)
        leave = ctx.masked & (u_move < 1.0 - (m_s - sigma_masked * a_t) / m_t)
        if not bool(remask.any()) and not bool(leave.any()):
            return ctx.z
        z = ctx.z.clone()
        z[remask] = ctx.mask_index
        if bool(leave.any()):
            z[leave] = ctx.draw(leave, u_token[leave])
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
    key/value cache). The denoiser returns logits or :class:`DeferredLogits`.
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
    calls = row_calls = prob_rows = 0
    cache = _RowCache(B, device)
    scores = torch.zeros(B, L, dtype=torch.float, device=device)
    chance = torch.zeros(B, L, dtype=torch.float64, device=device)
    history = [z.clone()] if retain_history else None

    def network(t, masked) -> _StepLogits:
        def compute(rows):
            nonlocal calls, row_calls
            calls, row_calls = calls + 1, row_calls + rows.numel()
            sigma = schedule.sigma(t).float().to(device).expand(rows.numel())
            extra = (rows,) if row_indexed else ()
            return denoiser(z[rows], sigma, masked[rows], *extra)

        if bool(masked.any()):
            cache.refresh(masked, compute)
        return _StepLogits(cache, masked)

    def probs(logits_at: _StepLogits):
        def at(where):
            nonlocal prob_rows
            logits = logits_at(where)
            prob_rows += logits.size(0)
            return denoise_probs(logits, mask_index, config.temperature, config.top_p)
        return at

    for k in range(steps):
        masked = z == mask_index
        logits_at = network(ts[k], masked)
        ctx = StepContext(k, ts[k].to(device), ts[k + 1].to(device), z, masked, given,
                          scores, chance, mask_index, schedule, generator, probs(logits_at))
        new = rule.step(ctx)
        changed = torch.zeros(B, dtype=torch.bool, device=device)
        if new is not z:
            drawn = masked & (new != mask_index)
            if bool(drawn.any()):
                scores[drawn] = _token_scores(logits_at(drawn), new[drawn], mask_index)
                chance[drawn] = ctx.drawn_chance[drawn]
            remasked = ~masked & (new == mask_index)            # remdm
            scores[remasked], chance[remasked] = 0.0, 0.0
            changed = (new != z).any(1)
            z = new
        cache.invalidate(changed if rule.reuses_outputs else torch.ones_like(changed))
        if retain_history:
            history.append(z.clone())

    masked = z == mask_index
    if bool(masked.any()):
        logits_at = network(ts[-1], masked)
        fill = probs(logits_at)(masked).argmax(-1)
        z[masked] = fill
        scores[masked] = _token_scores(logits_at(masked), fill, mask_index)
    return SampleResult(tokens=z, scores=scores, network_calls=calls, row_calls=row_calls,
                        steps=steps, history=history, prob_rows=prob_rows)


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
    prompt is returned unchanged (score 0); ``network_calls``, ``row_calls``,
    ``steps`` and ``prob_rows`` add up all windows.
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
        nonlocal tokens, scores, calls, row_calls, steps, prob_rows
        z = torch.cat([ctx, ctx.new_full((ctx.size(0), window - ctx.size(1)), mask_index)], 1)
        out = sample(denoiser, z, config, schedule, mask_index, generator)
        calls, row_calls = calls + out.network_calls, row_calls + out.row_calls
        steps, prob_rows = steps + out.steps, prob_rows + out.prob_rows
        tokens = torch.cat([tokens, out.tokens[:, ctx.size(1):]], 1)
        scores = torch.cat([scores, out.scores[:, ctx.size(1):]], 1)

    calls = row_calls = steps = prob_rows = 0
    tokens = prefix_tokens.long()
    scores = torch.zeros(tokens.shape, dtype=torch.float, device=tokens.device)
    if tokens.size(1) < window:
        fill(tokens)
    keep = window - stride
    while tokens.size(1) < total_length:
        fill(tokens[:, tokens.size(1) - keep:])
    return SampleResult(tokens=tokens[:, :total_length], scores=scores[:, :total_length],
                        network_calls=calls, row_calls=row_calls, steps=steps,
                        prob_rows=prob_rows)


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
