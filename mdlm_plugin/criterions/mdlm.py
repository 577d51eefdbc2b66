"""fairseq criterion ``mdlm``: where the loss is.

One Monte-Carlo draw of MDLM's continuous-time (or T-step discrete-time)
Rao-Blackwellized NELBO per batch, computed by ``diffusion.objective.nelbo`` (per
block for a block-diffusion model, ``diffusion.blocks.block_nelbo``); this file only
adapts fairseq's sample/model to it. The units, the evaluation protocol
(``--eval-passes``, ``--eval-seed``, ``bound_se``, ``scored_tokens``) and the training
noise are those of every bound criterion: see ``bound.py``.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.criterions import register_criterion

from ..diffusion.blocks import block_nelbo, check_mask_rate
from ..errors import MDLMUserError
from .bound import BoundCriterionConfig, DiffusionBoundCriterion


@dataclass
class MDLMCriterionConfig(BoundCriterionConfig):
    discrete_steps: int = field(
        default=0, metadata={"help": "T > 0: the discrete-time (T-step) bound instead of the "
                                     "continuous-time one (T = 0); always >= the latter"})
    train_mask_rate: Optional[List[float]] = field(
        default=None,
        metadata={"help": "LOW HIGH: training draws mask rates in [LOW, HIGH] (block "
                          "diffusion's clipped schedule; lower variance). Evaluation "
                          "always reports the full bound over [0, 1]"})


@register_criterion("mdlm", dataclass=MDLMCriterionConfig)
class MDLMCriterion(DiffusionBoundCriterion):
    name = "mdlm"

    def __init__(self, task, discrete_steps=0, time_sampling="antithetic", sampling_eps=1e-3,
                 train_mask_rate=None):
        super().__init__(task, time_sampling, sampling_eps)
        if discrete_steps < 0:
            raise MDLMUserError(f"--discrete-steps must be >= 0 (0 = continuous time), "
                                f"got {discrete_steps}")
        self.discrete_steps = discrete_steps
        self.train_mask_rate = None
        if train_mask_rate is not None:
            try:
                self.train_mask_rate = check_mask_rate(train_mask_rate)
            except ValueError as e:
                raise MDLMUserError(f"--train-mask-rate: {e}") from None
            if discrete_steps > 0:
                raise MDLMUserError("--train-mask-rate is a continuous-time training "
                                    "objective: leave out --discrete-steps with it")

    @classmethod
    def add_args(cls, parser):
        """fairseq's flags, with --train-mask-rate as two numbers (LOW HIGH)."""
        super().add_args(parser)
        for action in parser._actions:
            if "--train-mask-rate" in action.option_strings:
                action.nargs, action.type, action.metavar = 2, float, ("LOW", "HIGH")

    def draw(self, denoiser, x, pad_mask, generator, block_size=None, training=False):
        return block_nelbo(denoiser, x, self.task.schedule, self.task.mask_index, pad_mask,
                           block_size=block_size,
                           mask_rate=self.train_mask_rate if training else None,  # eval: full
                           discrete_steps=self.discrete_steps, antithetic=self.antithetic,
                           eps_t=self.sampling_eps, generator=generator)
