"""Noise schedules for absorbing-state (masked) diffusion. Pure torch.

A schedule gives the total noise sigma(t) on t in [0, 1]; the probability that a
token is still clean at time t is alpha_t = exp(-sigma(t)), so it is masked with
probability 1 - alpha_t = -expm1(-sigma(t)).

The continuous-time NELBO weights the masked-token cross-entropy by
    w(t) = -alpha'_t / (1 - alpha_t) = sigma'(t) / expm1(sigma(t)),
which for the default log-linear schedule is (almost exactly) 1 / t.
"""
from __future__ import annotations

import abc
import math

import torch


class NoiseSchedule(abc.ABC):
    """Base class: subclasses define ``sigma`` and its time derivative ``dsigma``."""

    name = "base"

    @abc.abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma(t)."""

    @abc.abstractmethod
    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        """Time derivative d sigma / dt."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is unmasked at time t."""
        return torch.exp(-self.sigma(t))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_t, computed without cancellation."""
        return -torch.expm1(-self.sigma(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time NELBO weight -alpha'_t / (1 - alpha_t) (positive)."""
        return self.dsigma(t) / torch.expm1(self.sigma(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LogLinearSchedule(NoiseSchedule):
    """1 - alpha_t = (1 - eps) t: masks a fraction of tokens linear in t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def sigma(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def dsigma(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def mask_prob(self, t):
        return (1 - self.eps) * t


class CosineSchedule(NoiseSchedule):
    """alpha_t = eps + (1 - eps) cos(pi t / 2)."""

    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def sigma(self, t):
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(0.5 * math.pi * t))

    def dsigma(self, t):
        c = torch.cos(0.5 * math.pi * t)
        s = torch.sin(0.5 * math.pi * t)
        return (1 - self.eps) * 0.5 * math.pi * s / (self.eps + (1 - self.eps) * c)


class LinearSchedule(NoiseSchedule):
    """sigma(t) = sigma_min + t (sigma_max - sigma_min)."""

    name = "linear"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 7.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def dsigma(self, t):
        return torch.full_like(t, self.sigma_max - self.sigma_min)


class GeometricSchedule(NoiseSchedule):
    """sigma(t) = sigma_min^(1 - t) sigma_max^t."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 7.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def dsigma(self, t):
        return self.sigma(t) * (math.log(self.sigma_max) - math.log(self.sigma_min))


# the registry: --noise-schedule NAME -> the class and which of its parameters it takes
SCHEDULES = {
    "loglinear": (LogLinearSchedule, ("eps",)),
    "cosine": (CosineSchedule, ("eps",)),
    "linear": (LinearSchedule, ("sigma_min", "sigma_max")),
    "geometric": (GeometricSchedule, ("sigma_min", "sigma_max")),
}


def build_schedule(name: str, eps: float = 1e-3, sigma_min: float = 1e-3,
                   sigma_max: float = 7.0) -> NoiseSchedule:
    """Build a schedule by name; an unknown name is one clear ValueError."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}: choose one of "
                         f"{', '.join(SCHEDULES)} (--noise-schedule)")
    cls, params = SCHEDULES[name]
    given = {"eps": eps, "sigma_min": sigma_min, "sigma_max": sigma_max}
    return cls(**{k: given[k] for k in params})
