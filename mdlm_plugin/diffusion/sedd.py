"""Score entropy discrete diffusion (SEDD, Lou et al. 2024, arXiv 2310.16834) on the
absorbing graph: its log-score parameterisation and its likelihood bound. Pure torch.

The forward process is the one of ``objective.py``: a token becomes ``<mask>`` (m)
with probability 1 - alpha_t = 1 - e^{-sigma(t)}, and never comes back. At a masked
position of z_t the *concrete score* is, for every token y != m,

    s(z_t)[y] = p_t(z_t with y there) / p_t(z_t) = p(x_0 = y | unmasked z_t) / expm1(sigma),

and the network gives it in log space (SEDD's absorbing "scale by sigma" form):

    log s_theta[y] = f_theta[y] - log expm1(sigma) - log(V - 1),   y != m,

with f_theta the network's logits over the V symbols (a zero output is the uniform
score of total 1 / expm1(sigma), the exact total). The ratio of z_t to itself is 1
and is not a jump, so the ``<mask>`` column is left out (-inf) of every sum here.

Training minimises the diffusion-weighted denoising score entropy: at each masked
position with clean token x0, with r = 1 / expm1(sigma) (the score of x0 given x0),

    sigma'(t) [ sum_{y != m} s_theta[y] - r log s_theta[x0] + r (log r - 1) ]  >= 0,

summed over masked positions and averaged over t in [eps, 1]; like MDLM's NELBO this
upper-bounds -log p(x) up to the same O(eps) boundary terms (Lou et al. 2024, Sec. 3).
With q[y] = e^{f[y]} / (V - 1) and Z = sum_{y != m} q[y], the term is

    w(t) [ -log(q[x0] / Z) ] + w(t) [ Z - 1 - log Z ],   w(t) = sigma' / expm1(sigma),

i.e. MDLM's NELBO term for the normalised x_theta = q / Z (same weight w, the one
of ``schedules.weight``) plus a penalty >= 0 on the score's total mass, zero iff
Z = 1. So the score entropy is never below the MDLM bound of the same network on
the same draws (``tests/test_sedd.py`` checks both facts).

Samples (the one place the parameterisation meets the samplers): the samplers take
x_theta, the clean-token distribution at a masked position. For a SEDD network it
is the normalised score, ``score_probs``; the per-row offset cancels, so it equals
the softmax of the logits over the non-mask symbols, exactly what
``samplers.denoise_probs`` computes from any ``mdlm`` model's logits. A SEDD-trained
``mdlm`` model therefore samples through the existing generator unchanged (no flag
in the checkpoint), and ``analytic`` is SEDD's Tweedie tau-leaping with the score's
total set to its exact value 1 / expm1(sigma) (see ``samplers._leave_probability``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .objective import (Denoiser, NelboTerms, at_positions, corrupt, masked_indices,
                        masked_terms, without_symbol)
from .schedules import NoiseSchedule


def log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    """log(e^sigma - 1) for sigma > 0, without overflow or cancellation."""
    return sigma + torch.log(-torch.expm1(-sigma))


def log_scores(logits: torch.Tensor, sigma: torch.Tensor, mask_index: int) -> torch.Tensor:
    """fp32 log s_theta (N, V) from the network's logits (N, V) at masked positions and
    the noise ``sigma`` (N,) of each; the ``<mask>`` column is -inf."""
    f = without_symbol(logits, mask_index)
    offset = log_expm1(sigma.double()) + math.log(logits.size(-1) - 1)
    return f - offset.float().unsqueeze(-1)


def score_probs(log_s: torch.Tensor) -> torch.Tensor:
    """x_theta (N, V) in float64: the scores normalised over the jumps (``<mask>``: 0)."""
    return torch.softmax(log_s.double(), dim=-1)


def score_entropy(log_s: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Score entropy (N,) of log scores (N, V) against the clean tokens ``target`` (N,)
    at noise ``sigma`` (N,): sum_y s[y] - r log s[x0] + r (log r - 1), r = 1/expm1(sigma).
    The (N, V) work is fp32 log-space; the per-row combination, where r log r terms
    cancel, is float64. Zero exactly when s is r at x0 and 0 elsewhere."""
    log_r = -log_expm1(sigma.double())
    r = log_r.exp()
    total = torch.logsumexp(log_s, dim=-1).exp()
    at_target = log_s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (total.double() - r * at_target.double() + r * (log_r - 1)).float()


def score_entropy_bound(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                        mask_index: int, pad_mask: Optional[torch.Tensor] = None, *,
                        antithetic: bool = True, eps_t: float = 1e-3,
                        generator: Optional[torch.Generator] = None,
                        t: Optional[torch.Tensor] = None) -> NelboTerms:
    """SEDD's bound on a batch ``x`` (B, L): one draw of t and masks (``corrupt``,
    the same draws as ``objective.nelbo`` from the same generator), the sum over masked
    positions of sigma'(t) * score entropy, in nats; padding never counts. Divide
    ``loss`` by ``n_tokens`` for nats per token."""
    pad_mask, t, z_t, masked = corrupt(x, schedule, mask_index, pad_mask, antithetic=antithetic,
                                       eps_t=eps_t, generator=generator, t=t)
    logits = denoiser(z_t, schedule.sigma(t), masked)
    index = masked_indices(masked, logits.size(0))      # as in objective.nelbo
    t_tok = at_positions(t.double(), index, x.size(1))
    sigma_tok = schedule.sigma(t_tok)
    log_s = log_scores(logits, sigma_tok, mask_index)
    target = at_positions(x, index, x.size(1))
    per_token = schedule.dsigma(t_tok).float() * score_entropy(log_s, sigma_tok, target)
    return masked_terms(per_token, index, pad_mask, t)

