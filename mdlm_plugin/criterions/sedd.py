"""fairseq criterion ``sedd``: score entropy discrete diffusion (Lou et al. 2024) on the
absorbing graph, trained and evaluated on the same task, data and backbone (model
``mdlm``) as ``--criterion mdlm``.

One Monte-Carlo draw per batch of SEDD's diffusion-weighted score entropy with its
log-score parameterisation, computed by ``diffusion.sedd.score_entropy_bound``
(which also documents the maths and how the scores become samples). The units, the
evaluation protocol (``--eval-passes``, ``--eval-seed``, ``bound_se``,
``scored_tokens``) and the training noise are those of ``--criterion mdlm``
(``bound.py``), so the two bounds compare cell for cell. SEDD's own recipe draws t
i.i.d. and conditions the network on the noise level: ``--time-sampling iid`` and the
model's ``--time-conditioning``.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion

from ..diffusion.sedd import score_entropy_bound
from ..errors import MDLMUserError
from .bound import BoundCriterionConfig, DiffusionBoundCriterion


@dataclass
class SEDDCriterionConfig(BoundCriterionConfig):
    """The flags of every bound criterion (no discrete-time variant: SEDD is continuous)."""


@register_criterion("sedd", dataclass=SEDDCriterionConfig)
class SEDDCriterion(DiffusionBoundCriterion):
    name = "sedd"

    def draw(self, denoiser, x, pad_mask, generator, block_size=None, training=False):
        if block_size is not None:
            raise MDLMUserError("--criterion sedd trains on the whole window: block "
                                "diffusion (--block-size) is available with --criterion mdlm")
        return score_entropy_bound(denoiser, x, self.task.schedule, self.task.mask_index,
                                   pad_mask, antithetic=self.antithetic,
                                   eps_t=self.sampling_eps, generator=generator)
