"""Block diffusion (BD3-LM, Arriola et al. 2025): the objective and block-by-block
sampling. Pure torch.

A sequence of L tokens is a chain of blocks of L' tokens (the last one may be
shorter); block b is a masked diffusion conditioned on the clean blocks before it:

    -log p(x) <= sum_b NELBO(x_b | x_<b).

Each block of the batch gets its own time t_b (antithetic over all the blocks of
the batch) and its own masks; the loss is ``objective.nelbo`` with those per-token
times, so the weights, SUBS and the fp32 reduction are MDLM's. The network sees
the noisy copy and the clean copy of the sequence in one pass (the model's
``forward_blocks``), which ``nelbo`` reaches through the usual denoiser
``(z_t, sigma, positions) -> logits``. L' = L is MDLM; L' = 1 with every token
masked is the left-to-right NLL.

Training-only mask-rate range (``mask_rate=(lo, hi)``, the paper's clipped
schedule): the time is then the mask rate itself, t = lo + (hi - lo) * t0 with t0
drawn as usual, tokens are masked with probability t and weighted by 1/t (the
continuous-time weight written in the mask rate m = 1 - alpha_t: w dt = dm / m,
whatever the schedule), ``sigma`` = -log(1 - t) (capped at the schedule's
sigma(1)). With (lo, hi) = (0, 1) it estimates the same bound; a narrower range
lowers the variance and is no longer a bound, so evaluation never uses it.

Sampling: blocks left to right. The committed clean blocks are run once into the
caller's key/value cache (``context.commit``; a context may run a commit in the same
pass as the next block's first step); each new block is filled by any sampler of
``samplers.py`` through a denoiser that attends to that cache; the shared sampling
loop tells it which batch rows each call is about (``row_indexed``: a sampler may run
a subset of the rows). The denoiser may return ``samplers.DeferredLogits``: the output
layer then runs only where a step draws a token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple, Union

import torch

from .objective import Denoiser, NelboTerms, nelbo, sample_times
from .samplers import SampleResult, SamplerConfig, sample
from .schedules import NoiseSchedule


class MaskRateSchedule(NoiseSchedule):
    """Time = mask rate: 1 - alpha_t = t exactly, w(t) = 1/t, sigma = -log(1 - t)
    capped at ``sigma_max`` (what a time-conditioned network is fed at t = 1): a number,
    or a 0-dim tensor on the times' device (read by no one on the host)."""

    name = "mask_rate"

    def __init__(self, sigma_max: Union[float, torch.Tensor]):
        self.sigma_max = sigma_max if torch.is_tensor(sigma_max) else float(sigma_max)

    def sigma(self, t):
        return (-torch.log1p(-t)).clamp(max=self.sigma_max)

    def dsigma(self, t):
        return 1.0 / (1.0 - t)

    def mask_prob(self, t):
        return t

    def weight(self, t):
        return 1.0 / t


def check_block_size(block_size: int, window: int) -> None:
    """ValueError unless 1 <= block_size <= window and block_size divides window."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"the block size must be an integer >= 1, got {block_size!r}")
    if window % block_size != 0:
        raise ValueError(f"the block size {block_size} must divide the window of "
                         f"{window} tokens")


def check_mask_rate(mask_rate: Sequence[float]) -> Tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi <= 1 and hi > 0, else ValueError."""
    if len(mask_rate) != 2:
        raise ValueError(f"the mask-rate range takes two numbers LOW HIGH, got "
                         f"{list(mask_rate)}")
    lo, hi = (float(v) for v in mask_rate)
    if not (0.0 <= lo <= hi <= 1.0) or hi == 0.0:
        raise ValueError(f"the mask-rate range must satisfy 0 <= LOW <= HIGH <= 1 and "
                         f"HIGH > 0, got LOW={lo:g} HIGH={hi:g}")
    return lo, hi


def block_nelbo(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule,
                mask_index: int, pad_mask: Optional[torch.Tensor] = None, *,
                block_size: Optional[int] = None,
                mask_rate: Optional[Tuple[float, float]] = None, discrete_steps: int = 0,
                antithetic: bool = True, eps_t: float = 1e-3,
                generator: Optional[torch.Generator] = None) -> NelboTerms:
    """One draw of the NELBO of ``x`` (B, L), per block of ``block_size`` tokens
    (None: the whole row, MDLM) and optionally with a training mask-rate range.

    Without both it is exactly ``objective.nelbo`` (same draws, same numbers).
    ``denoiser`` must see the clean blocks before each block (a block model's
    training denoiser); ``terms.t`` is (B, number of blocks). The antithetic grid
    runs over the blocks of the batch, block-major, so each row's blocks spread
    over [0, 1] too.
    """
    if block_size is None and mask_rate is None:
        return nelbo(denoiser, x, schedule, mask_index, pad_mask,
                     discrete_steps=discrete_steps, antithetic=antithetic, eps_t=eps_t,
                     generator=generator)
    if mask_rate is not None and discrete_steps > 0:
        raise ValueError("a training mask-rate range is a continuous-time objective: "
                         "it cannot be combined with discrete_steps > 0")
    B, L = x.shape
    n_blocks = 1 if block_size is None else -(-L // block_size)
    t = sample_times(B * n_blocks, antithetic=antithetic, eps_t=eps_t,
                     discrete_steps=discrete_steps, device=x.device,
                     generator=generator).view(n_blocks, B).t()
    if mask_rate is not None:
        lo, hi = check_mask_rate(mask_rate)
        t = lo + (hi - lo) * t
        schedule = MaskRateSchedule(schedule.sigma(torch.ones((), device=x.device)))
    token_t = t[:, 0] if block_size is None else \
        t.repeat_interleave(block_size, dim=1)[:, :L]
    terms = nelbo(denoiser, x, schedule, mask_index, pad_mask,
                  discrete_steps=discrete_steps, generator=generator, t=token_t)
    terms.t = t
    return terms


class BlockContext(Protocol):
    """What block sampling needs from a model (``MDLMModel.block_context``)."""

    def denoise(self, rows: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Logits (N, V), or ``DeferredLogits``, at ``positions`` of the block ``z``
        (b, L') of the active rows ``rows`` (b,), given their committed blocks."""

    def commit(self, tokens: torch.Tensor) -> None:
        """Append the clean block ``tokens`` (B, L') of every active row (now, or with
        the next call of ``denoise``)."""

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the active rows ``index`` (in that order)."""


@dataclass
class BlockSampleResult(SampleResult):
    """``SampleResult`` plus ``lengths`` (B,): each row's length (``stop_token``)."""

    lengths: Optional[torch.Tensor] = None


def _sample_block(context: BlockContext, block: torch.Tensor, config: SamplerConfig,
                  schedule: NoiseSchedule, mask_index: int,
                  generator: Optional[torch.Generator]) -> SampleResult:
    """``samplers.sample`` on one block, each call given the batch rows it is about."""
    def denoise(z, sigma, positions, rows):
        return context.denoise(rows, z, sigma, positions)

    return sample(denoise, block, config, schedule, mask_index, generator=generator,
                  row_indexed=True)


@torch.no_grad()
def sample_blocks(context: BlockContext, z: torch.Tensor, block_size: int,
                  config: SamplerConfig, schedule: NoiseSchedule, mask_index: int,
                  generator: Optional[torch.Generator] = None, *,
                  stop_token: Optional[int] = None) -> BlockSampleResult:
    """Fill every ``mask_index`` of ``z`` (B, N) block by block (blocks at positions
    0, L', 2L', ...; given tokens are kept), each block with ``config.steps`` steps of
    ``config.sampler``; each block is committed once, when it is done and a later
    block follows. With ``stop_token``, a row stops at the first such token the
    sampler fills: ``lengths`` (B,) give each row's length (N otherwise) and the
    tokens after it are left as in ``z``. ``network_calls``/``row_calls`` count the
    commits too (a commit the context runs with the next block's first step still
    counts as a call); ``steps`` and ``prob_rows`` sum the blocks sampled."""
    check_block_size(block_size, block_size)
    z = z.clone()
    B, N = z.shape
    scores = torch.zeros(B, N, dtype=torch.float, device=z.device)
    lengths = torch.full((B,), N, dtype=torch.long, device=z.device)
    active = torch.arange(B, device=z.device)
    calls = row_calls = steps = prob_rows = 0
    for start in range(0, N, block_size):
        end = min(start + block_size, N)
        todo = z[active, start:end] == mask_index
        if bool(todo.any()):
            out = _sample_block(context, z[active, start:end], config, schedule,
                                mask_index, generator)
            z[active, start:end], scores[active, start:end] = out.tokens, out.scores
            calls, row_calls = calls + out.network_calls, row_calls + out.row_calls
            steps, prob_rows = steps + out.steps, prob_rows + out.prob_rows
            if stop_token is not None:
                hit = (out.tokens == stop_token) & todo
                done = hit.any(1)
                if bool(done.any()):
                    first = hit.long().argmax(1)
                    lengths[active[done]] = start + first[done] + 1
                    active = active[~done]
                    if active.numel() == 0:
                        break
                    context.keep((~done).nonzero().squeeze(1))
        if end < N:
            context.commit(z[active, start:end])
            calls, row_calls = calls + 1, row_calls + active.numel()
    return BlockSampleResult(tokens=z, scores=scores, network_calls=calls,
                             row_calls=row_calls, steps=steps, lengths=lengths,
                             prob_rows=prob_rows)
