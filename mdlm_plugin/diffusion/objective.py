"""The MDLM training objective and likelihood estimators. Pure torch.

Everything here talks to the network through a *denoiser* callable

    denoiser(z_t, sigma, positions) -> logits

where ``z_t`` is a (B, L) long tensor of partly masked tokens, ``sigma`` the (B,)
total noise of each row (ignored by models without time conditioning) and
``positions`` a (B, L) bool tensor; the denoiser returns float logits over the
vocabulary for the selected positions only, shape (N, V) with N = positions.sum(),
in row-major order. Asking only for the masked positions skips the output head
where SUBS makes the answer known. The bounds read N off the logits' shape rather
than counting the positions again: on a GPU a count is a device-to-host read, and
the denoiser has already made the one the step needs (``docs/gpu.md``).

SUBS parameterization (Sahoo et al. 2024): the ``<mask>`` logit is -inf (the model
never predicts a mask) and unmasked positions copy their input (log-prob 0), so
they contribute nothing to the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def without_symbol(logits: torch.Tensor, index: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A copy of ``logits`` (..., V) in ``dtype`` with column ``index`` set to -inf.

    The column is filled through a view with a Python scalar: no index tensor is built
    per call (``torch.tensor([index], device=...)`` is a blocking host-to-device copy on
    a GPU), and the copy is the only one made, whatever the logits' dtype."""
    out = logits.to(dtype, copy=True)
    out.select(-1, index).fill_(float("-inf"))
    return out


def log_probs_without_mask(logits: torch.Tensor, mask_index: int) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary with ``<mask>`` excluded (SUBS rule 1)."""
    return F.log_softmax(without_symbol(logits, mask_index), dim=-1)


def subs_log_probs(logits: torch.Tensor, z_t: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Full SUBS output log x_theta(z_t) of shape (B, L, V) from logits (B, L, V).

    Masked positions: log-softmax without ``<mask>``; unmasked positions: the
    one-hot of the observed token in log space (0 there, -inf elsewhere).
    """
    lp = log_probs_without_mask(logits, mask_index)
    observed = z_t != mask_index
    copy = torch.full_like(lp, float("-inf"))
    copy.scatter_(-1, z_t.unsqueeze(-1), 0.0)
    return torch.where(observed.unsqueeze(-1), copy, lp)


def sample_times(n: int, *, antithetic: bool = True, eps_t: float = 1e-3,
                 discrete_steps: int = 0, device=None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Diffusion times for a batch of ``n`` sequences.

    Antithetic (low-discrepancy) sampling: u_i = (u_0 + i / n) mod 1, one uniform
    draw shifted over an even grid, which lowers the variance of the batch mean.
    Continuous time: t = (1 - eps_t) u + eps_t in [eps_t, 1]. Discrete time with T
    steps: t in {1/T, ..., 1}, uniformly.
    """
    if antithetic:
        u0 = torch.rand(1, device=device, generator=generator, dtype=torch.float64)
        u = (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
    else:
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
    if discrete_steps > 0:
        k = torch.clamp(torch.floor(u * discrete_steps), max=discrete_steps - 1) + 1
        return (k / discrete_steps).float()
    return ((1 - eps_t) * u + eps_t).float()


def mask_tokens(x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, mask_index: int,
                pad_mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
    """Forward process q(z_t | x): mask each (non-pad) token with prob 1 - alpha_t.

    ``t`` is (B,) (one time per row) or (B, L) (one per token, e.g. per block).
    Returns ``(z_t, masked)`` where ``masked`` marks the positions turned into
    ``<mask>``. Padding is never masked.
    """
    p = tokenwise(schedule.mask_prob(t.float()))
    u = torch.rand(x.shape, device=x.device, generator=generator)
    masked = u < p
    if pad_mask is not None:
        masked &= ~pad_mask
    z_t = x.masked_fill(masked, mask_index)
    return z_t, masked


def tokenwise(v: torch.Tensor) -> torch.Tensor:
    """A per-row (B,) quantity as (B, 1), broadcasting over tokens; (B, L) as is."""
    return v.unsqueeze(-1) if v.dim() == 1 else v


def masked_indices(masked: torch.Tensor, n: int) -> torch.Tensor:
    """Row-major flat indices (n,) of the True entries of ``masked`` (B, L), whose number
    ``n`` the caller already knows on the host (the rows of the logits the denoiser
    returned for them). ``nonzero_static`` has a fixed output shape, so unlike
    ``masked.nonzero()`` or ``x[masked]`` it reads nothing back from a GPU."""
    return torch.nonzero_static(masked.reshape(-1), size=n).squeeze(1)


def at_positions(v: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """The values (n,) at the flat ``index`` of a (B, L) grid of ``length`` columns: of
    a per-token (B, L) tensor, or of a per-row (B,) one (its row's value)."""
    if v.dim() == 1:
        return v.index_select(0, torch.div(index, length, rounding_mode="floor"))
    return v.reshape(-1).index_select(0, index)


def loss_weights(t: torch.Tensor, schedule: NoiseSchedule, discrete_steps: int = 0) -> torch.Tensor:
    """Per-sequence weight of a masked token's cross-entropy.

    Continuous time (T = 0): w(t) = -alpha'_t / (1 - alpha_t).
    Discrete time with T steps (t in {1/T..1}, s = t - 1/T): the KL of step t -> s
    under SUBS is (alpha_s - alpha_t) / (1 - alpha_t) times the cross-entropy, and
    the sum over T steps is estimated by T times a uniformly drawn step.
    """
    t = t.double()
    if discrete_steps <= 0:
        return schedule.weight(t).float()
    s = t - 1.0 / discrete_steps
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    return (discrete_steps * (a_s - a_t) / schedule.mask_prob(t)).float()


@dataclass
class NelboTerms:
    """One Monte-Carlo draw of the NELBO on a batch (natural log, nats)."""

    loss: torch.Tensor            # scalar: sum over tokens of the weighted cross-entropy
    per_sequence: torch.Tensor    # (B,) the same sum per row (detached)
    n_tokens: torch.Tensor        # 0-dim count of non-pad tokens: the normalizer of the
                                  # bound (a tensor: counting on the host would wait for
                                  # the device; a fairseq batch carries it as ``ntokens``)
    n_masked: int                 # tokens the network was asked about (its logits' rows)
    t: torch.Tensor               # (B,) the times drawn


def corrupt(x: torch.Tensor, schedule: NoiseSchedule, mask_index: int,
            pad_mask: Optional[torch.Tensor] = None, *, discrete_steps: int = 0,
            antithetic: bool = True, eps_t: float = 1e-3,
            generator: Optional[torch.Generator] = None, t: Optional[torch.Tensor] = None,
            z_t: Optional[torch.Tensor] = None):
    """One draw of the forward process on a batch ``x`` (B, L): the times ``t`` (B,)
    (drawn by ``sample_times`` unless given) and ``(z_t, masked)`` of ``mask_tokens``
    (unless ``z_t`` is given: a draw made elsewhere, e.g. by the reference code, with
    ``t`` its times). Returns ``(pad_mask, t, z_t, masked)``; shared by every bound in
    the package."""
    if pad_mask is None:
        pad_mask = torch.zeros_like(x, dtype=torch.bool)
    if t is None:
        t = sample_times(x.size(0), antithetic=antithetic, eps_t=eps_t,
                         discrete_steps=discrete_steps, device=x.device, generator=generator)
    if z_t is None:
        z_t, masked = mask_tokens(x, t, schedule, mask_index, pad_mask, generator)
    else:
        masked = z_t.eq(mask_index) & ~pad_mask
    return pad_mask, t, z_t, masked


def masked_terms(per_token: torch.Tensor, index: torch.Tensor, pad_mask: torch.Tensor,
                 t: torch.Tensor) -> NelboTerms:
    """The :class:`NelboTerms` of per-token losses (N,) at the flat row-major positions
    ``index`` (N,) of ``masked_indices`` (the order of ``x[masked]``)."""
    B, L = pad_mask.shape
    row = torch.div(index, L, rounding_mode="floor")
    per_seq = torch.zeros(B, device=pad_mask.device).index_add_(0, row, per_token.detach())
    return NelboTerms(loss=per_token.sum(), per_sequence=per_seq,
                      n_tokens=(~pad_mask).sum(), n_masked=index.numel(), t=t)


def nelbo(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, mask_index: int,
          pad_mask: Optional[torch.Tensor] = None, *, discrete_steps: int = 0,
          antithetic: bool = True, eps_t: float = 1e-3,
          generator: Optional[torch.Generator] = None,
          t: Optional[torch.Tensor] = None, z_t: Optional[torch.Tensor] = None) -> NelboTerms:
    """Rao-Blackwellized NELBO of a batch ``x`` (B, L), one draw of t and of masks
    (pass ``t`` (B,) to fix the times instead of drawing them; ``t`` (B, L) gives
    each token its own time, as block diffusion does per block: ``sigma`` is then
    passed to the denoiser per token too; pass ``t`` and ``z_t`` to score a draw of
    the forward process made elsewhere).

    Sum over masked positions of  w(t) * -log x_theta(z_t)[x]  in fp32; unmasked
    positions contribute exactly 0 under SUBS and padding never counts. Divide
    ``loss`` by ``n_tokens`` for nats per token (an upper bound on the NLL).
    """
    pad_mask, t, z_t, masked = corrupt(x, schedule, mask_index, pad_mask,
                                       discrete_steps=discrete_steps, antithetic=antithetic,
                                       eps_t=eps_t, generator=generator, t=t, z_t=z_t)
    sigma = schedule.sigma(t)
    logits = denoiser(z_t, sigma, masked)
    # the denoiser's rows say how many positions are masked: no count read back here
    index = masked_indices(masked, logits.size(0))
    lp = log_probs_without_mask(logits, mask_index)
    nll = -lp.gather(-1, at_positions(x, index, x.size(1)).unsqueeze(-1)).squeeze(-1)
    w = at_positions(loss_weights(t, schedule, discrete_steps), index, x.size(1))
    return masked_terms(w * nll, index, pad_mask, t)


@torch.no_grad()
def any_order_nll(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                  mask_index: int, pad_mask: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-row NLL (nats) of an any-order autoregressive model, one random order.

    Starting from all-masked, reveal the tokens one at a time in a uniformly random
    order, scoring each with the denoiser's SUBS distribution given what is revealed
    so far. Averaged over orders this equals the continuous-time NELBO of a model
    without time conditioning (Ou et al. 2024): an estimator independent of t and
    of the loss weights. Costs L network calls. ``sigma`` passed to the denoiser
    is the schedule's noise at the matching masked fraction.
    """
    if pad_mask is None:
        pad_mask = torch.zeros_like(x, dtype=torch.bool)
    B, L = x.shape
    keys = torch.rand(B, L, device=x.device, generator=generator)
    keys = keys.masked_fill(pad_mask, float("inf"))   # pads go last and are skipped
    order = keys.argsort(dim=-1)
    z = x.masked_fill(~pad_mask, mask_index)
    n_real = (~pad_mask).sum(-1)
    total = torch.zeros(B, device=x.device)
    rows = torch.arange(B, device=x.device)
    for step in range(L):
        pos = order[:, step]
        active = step < n_real
        if not bool(active.any()):
            break
        frac = (n_real - step).clamp(min=1).double() / n_real.clamp(min=1).double()
        t = frac.clamp(max=1.0)
        sigma = schedule.sigma(t).float()
        sel = torch.zeros_like(pad_mask)
        sel[rows[active], pos[active]] = True
        logits = denoiser(z, sigma, sel)
        lp = log_probs_without_mask(logits, mask_index)
        tgt = x[rows[active], pos[active]]
        total[active] -= lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        z[rows[active], pos[active]] = tgt
    return total
