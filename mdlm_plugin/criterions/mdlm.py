"""fairseq criterion ``mdlm``: where the loss is.

One Monte-Carlo draw of MDLM's continuous-time (or T-step discrete-time)
Rao-Blackwellized NELBO per batch, computed by ``diffusion.objective.nelbo``;
this file only adapts fairseq's sample/model to it. The units, the evaluation
protocol (``--eval-passes``, ``--eval-seed``, ``bound_se``, ``scored_tokens``) and the
training noise are those of every bound criterion: see ``bound.py``.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from ..diffusion.objective import nelbo
from ..errors import MDLMUserError
from .bound import BoundCriterionConfig, DiffusionBoundCriterion


@dataclass
class MDLMCriterionConfig(BoundCriterionConfig):
    discrete_steps: int = field(
        default=0, metadata={"help": "T > 0: the discrete-time (T-step) bound instead of the "
                                     "continuous-time one (T = 0); always >= the latter"})


@register_criterion("mdlm", dataclass=MDLMCriterionConfig)
class MDLMCriterion(DiffusionBoundCriterion):
    name = "mdlm"

    def __init__(self, task, discrete_steps=0, time_sampling="antithetic", sampling_eps=1e-3):
        super().__init__(task, time_sampling, sampling_eps)
        if discrete_steps < 0:
            raise MDLMUserError(f"--discrete-steps must be >= 0 (0 = continuous time), "
                                f"got {discrete_steps}")
        self.discrete_steps = discrete_steps

    def draw(self, denoiser, x, pad_mask, generator):
        return nelbo(denoiser, x, self.task.schedule, self.task.mask_index, pad_mask,
                     discrete_steps=self.discrete_steps, antithetic=self.antithetic,
                     eps_t=self.sampling_eps, generator=generator)
