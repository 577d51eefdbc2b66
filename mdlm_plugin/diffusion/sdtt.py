"""Self-distillation through time (SDTT; Deschenaux & Gulcehre 2024). Pure torch.

A round distils a teacher, sampled with 2T steps, into a student sampled with T
steps. The student's sampling grid is the samplers' grid
t_k = linspace(1, t_min, T + 1)[k]; the teacher's grid of 2T steps holds every t_k
and the midpoints m_k = (t_k + t_{k+1}) / 2.

One training draw (``sdtt_loss``), for each row of a batch of clean sequences x:

1. k uniform in {0, ..., T-1}; z_t ~ q(z_t | x) at t = t_k (the forward process).
2. The teacher's first step t_k -> m_k: its x_theta at z_t (x1) and one step of the
   sampler's rule (``samplers.Ancestral``: ddpm, or the analytic kernel) gives z_m.
   Tokens unmasked in this step feed the second teacher call.
3. The teacher's x_theta at z_m (x2), at the positions still masked there.
4. The target at each position masked in z_t (SDTT's code, ``_teacher_logprobs_on_mask``):
   x1 where the first step unmasked the position, x2 elsewhere, i.e. the clean-token
   distribution the teacher used (or would use) to fill the position in its two steps.
   The teacher's second step m_k -> t_{k+1} draws tokens from x2 but changes no
   target (a position it unmasks and one it leaves masked both get x2), so it is not
   drawn.
5. The student's x_theta at z_t (time t_k) is matched to the target at each masked
   position: reverse KL(student || target) by default (SDTT's best), forward KL, or the
   mean squared difference of the log-probabilities (SDTT's ``mse``).

The target is random (through z_m); its expectation given z_t is
P1 x1 + (1 - P1) E[x2 | the position stays masked], P1 = the kernel's probability of
leaving the mask in the first step. The forward-KL student converges to that mean; the
reverse-KL student to the normalised geometric mean exp(E[log target]).

Differences from SDTT's public code, on purpose: t is drawn on the student's grid (the
only times a T-step sampler visits) rather than uniformly in [eps, 1]; the teacher's
two times are t_k and m_k (their code's second time, ``t_start * space + (1 - t_start)
* t_end``, is not the midpoint). Categorical draws are float64 (the samplers'); the
divergence is computed in fp32 log space with ``<mask>`` left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .objective import Denoiser, log_probs_without_mask, mask_tokens
from .samplers import Ancestral, SamplerConfig, StepContext, denoise_probs
from .schedules import NoiseSchedule

DIVERGENCES = ("reverse_kl", "kl", "mse")
TEACHER_SAMPLERS = ("ddpm", "ddpm_cache", "analytic")
T_MIN = SamplerConfig.t_min          # the samplers' (and fairseq-generate's) last time


def halving_rounds(start: int, stop: int) -> List[int]:
    """The students' step counts from a teacher sampled with ``start`` steps down to
    ``stop``: start/2, start/4, ..., stop. ``stop`` must be start / 2^r, r >= 1."""
    check_steps_reachable(stop, start, by_rounds=True)
    rounds, steps = [], start
    while steps > stop:
        steps //= 2
        rounds.append(steps)
    return rounds


def check_steps_reachable(steps: int, teacher_steps: Optional[int],
                          by_rounds: bool = False) -> None:
    """ValueError unless a student of ``steps`` steps can follow a teacher of
    ``teacher_steps`` (None: a model trained on data, sampled with any number of
    steps). One round halves: teacher_steps == 2 * steps; ``by_rounds``: any number of
    rounds, teacher_steps == steps * 2^r with r >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the student's step count must be a positive integer, got {steps!r}")
    if teacher_steps is None:
        return
    ratio = teacher_steps / steps
    if by_rounds:
        ok = teacher_steps % steps == 0 and ratio >= 2 and (int(ratio) & (int(ratio) - 1)) == 0
        if not ok:
            raise ValueError(
                f"{steps} steps is not reachable by halving {teacher_steps} steps (each round "
                f"halves the step count: {teacher_steps} / 2^r)")
    elif teacher_steps != 2 * steps:
        raise ValueError(
            f"the teacher was distilled for {teacher_steps} steps, so this round's student "
            f"takes {teacher_steps // 2} (one round halves the step count), not {steps}")


def round_times(n: int, steps: int, t_min: float = T_MIN,
                generator: Optional[torch.Generator] = None, device=None):
    """For ``n`` rows: (t, m, s) float64 (n,), a uniform step t = t_k -> s = t_{k+1}
    of the T-step grid and its midpoint m."""
    grid = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    k = torch.randint(0, steps, (n,), generator=generator, device=device).cpu()
    t, s = grid[k], grid[k + 1]
    return t.to(device), ((t + s) / 2).to(device), s.to(device)


def _sigma(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    return schedule.sigma(t).float()


@torch.no_grad()
def teacher_first_step(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor,
                       m: torch.Tensor, schedule: NoiseSchedule, mask_index: int,
                       sampler: str = "ddpm", time_conditioned: bool = False,
                       generator: Optional[torch.Generator] = None):
    """The teacher's step t -> m from z_t (B, L), t and m (B,): (its logits at the
    masked positions of z_t (N, V), z_m (B, L)). The step is the samplers' ancestral
    rule; ``sampler`` and ``time_conditioned`` are checked as the samplers check them
    (``samplers.SamplerError``)."""
    config = SamplerConfig(sampler=sampler, steps=1, time_conditioned=time_conditioned)
    masked = z_t == mask_index
    logits = teacher(z_t, _sigma(schedule, t), masked)
    rank = torch.full(z_t.shape, -1, dtype=torch.long, device=z_t.device)
    rank[masked] = torch.arange(logits.size(0), device=z_t.device)
    # one time per row, (B, 1): the rule's leave probability broadcasts over positions
    ctx = StepContext(0, t.view(-1, 1), m.view(-1, 1), z_t, masked, ~masked,
                      torch.zeros(z_t.shape), torch.zeros(z_t.shape, dtype=torch.float64),
                      mask_index, schedule, generator,
                      lambda where: denoise_probs(logits[rank[where]], mask_index))
    return logits, Ancestral(config).step(ctx)


@torch.no_grad()
def two_step_target(teacher: Denoiser, z_t: torch.Tensor, z_m: torch.Tensor,
                    first_logits: torch.Tensor, m: torch.Tensor, schedule: NoiseSchedule,
                    mask_index: int) -> torch.Tensor:
    """SDTT's target (fp32 log-probabilities (N, V), ``<mask>`` at -inf) at the N masked
    positions of z_t, row-major: the teacher's x_theta at z_t (``first_logits``) where
    z_m unmasked the position, its x_theta at z_m (time m) where z_m did not."""
    target = log_probs_without_mask(first_logits, mask_index)
    masked_m = z_m == mask_index
    if bool(masked_m.any()):
        second = teacher(z_m, _sigma(schedule, m), masked_m)
        target[masked_m[z_t == mask_index]] = log_probs_without_mask(second, mask_index)
    return target


def divergence(student_lp: torch.Tensor, target_lp: torch.Tensor, mask_index: int,
               kind: str = "reverse_kl") -> torch.Tensor:
    """Per position (N,) fp32: reverse KL(student || target), forward KL(target ||
    student), or the mean over the vocabulary (``<mask>`` left out) of the squared
    log-probability difference. Inputs are log-probabilities (N, V), -inf at ``<mask>``."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}: choose one of {', '.join(DIVERGENCES)}")
    keep = torch.ones(student_lp.size(-1), dtype=torch.bool, device=student_lp.device)
    keep[mask_index] = False
    s, q = student_lp.float()[:, keep], target_lp.float()[:, keep]
    if kind == "reverse_kl":
        return (s.exp() * (s - q)).sum(-1)
    if kind == "kl":
        return (q.exp() * (q - s)).sum(-1)
    return (s - q).pow(2).mean(-1)


@dataclass
class SDTTTerms:
    """One draw: ``per_position`` (N,) the divergence at each masked position of
    ``z_t`` (row-major), ``t`` (B,) each row's time."""

    per_position: torch.Tensor
    z_t: torch.Tensor
    t: torch.Tensor

    @property
    def n_masked(self) -> int:
        return int(self.per_position.numel())


def sdtt_loss(student: Denoiser, teacher: Denoiser, x: torch.Tensor,
              schedule: NoiseSchedule, mask_index: int, steps: int,
              pad_mask: Optional[torch.Tensor] = None, divergence_kind: str = "reverse_kl",
              sampler: str = "ddpm", time_conditioned: bool = False,
              t_min: float = T_MIN, generator: Optional[torch.Generator] = None
              ) -> SDTTTerms:
    """One SDTT draw on clean sequences ``x`` (B, L) for a student of ``steps`` steps
    (the module docstring); gradients flow to the student only."""
    t, m, _ = round_times(x.size(0), steps, t_min, generator, x.device)
    z_t, _ = mask_tokens(x, t, schedule, mask_index, pad_mask, generator)
    first, z_m = teacher_first_step(teacher, z_t, t, m, schedule, mask_index, sampler,
                                    time_conditioned, generator)
    target = two_step_target(teacher, z_t, z_m, first, m, schedule, mask_index)
    masked = z_t == mask_index
    student_lp = log_probs_without_mask(student(z_t, _sigma(schedule, t), masked), mask_index)
    return SDTTTerms(divergence(student_lp, target, mask_index, divergence_kind), z_t, t)
