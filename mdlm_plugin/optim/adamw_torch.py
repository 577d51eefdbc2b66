"""fairseq optimizer ``adamw_torch``: torch's own AdamW, fused or foreach.

fairseq's ``adam`` runs apex's FusedAdam when apex is importable and CUDA is
present, and otherwise its own Python loop of per-parameter ops (one kernel launch
per op and parameter). ``--optimizer adamw_torch`` gives the fused speed without
compiling apex: ``torch.optim.AdamW`` with

* ``fused=True`` (one fused kernel over all parameters) when the parameters are on
  CUDA: ``--adamw-impl auto`` (the default) picks this on GPUs;
* ``foreach=True`` (multi-tensor ops) otherwise: ``auto`` picks this on CPU;
* ``--adamw-impl fused|foreach|for`` forces one (``for`` is the per-parameter loop;
  torch also has a fused CPU kernel, which ``fused`` selects on CPU).

The flags are those of fairseq's ``adam`` (``--adam-betas``, ``--adam-eps``,
``--weight-decay``, ``--lr``), and so is the update: weight decay is decoupled
(``p -= lr * wd * p``, AdamW), as fairseq's ``adam`` does. One difference: fairseq's
own ``adam`` adds eps to sqrt(v) *before* the bias correction of v (in effect eps /
sqrt(1 - beta2^t)), torch (and apex) after it; with eps = 1e-8 the updates agree to
about 1e-6 relative wherever sqrt(v) is well above eps.

Mixed precision: ``--amp`` keeps fp32 parameters (fused/foreach apply directly);
``--fp16``/``--bf16`` keep fp32 master copies (flattened into one tensor, which
this optimizer supports). ``--memory-efficient-fp16`` is refused by fairseq,
because torch's AdamW would keep half-precision moments.
"""
import ast
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from ..errors import MDLMUserError

logger = logging.getLogger(__name__)

IMPLS = ["auto", "fused", "foreach", "for"]


@dataclass
class AdamWTorchConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for AdamW"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    adamw_impl: ChoiceEnum(IMPLS) = field(
        default="auto",
        metadata={"help": "torch AdamW kernel: auto = fused on CUDA, foreach on CPU; "
                          "fused (one fused kernel), foreach (multi-tensor ops), for "
                          "(per-parameter loop)"})
    lr: List[float] = II("optimization.lr")


def choose_impl(requested: str, params) -> str:
    """The implementation ``auto`` resolves to for these parameters."""
    if requested != "auto":
        return requested
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return "fused" if on_cuda else "foreach"


@register_optimizer("adamw_torch", dataclass=AdamWTorchConfig)
class AdamWTorch(FairseqOptimizer):
    def __init__(self, cfg: AdamWTorchConfig, params):
        super().__init__(cfg)
        params = list(params)
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        self.impl = choose_impl(str(cfg.adamw_impl), tensors)
        try:
            self._optimizer = torch.optim.AdamW(params, **self.optimizer_config)
        except (RuntimeError, ValueError) as e:
            raise MDLMUserError(f"--adamw-impl {self.impl} is not available for these "
                                f"parameters ({e}); use --adamw-impl auto") from None
        logger.info("adamw_torch: torch.optim.AdamW, %s implementation "
                    "(--adamw-impl %s)", self.impl, cfg.adamw_impl)

    @property
    def optimizer_config(self):
        """AdamW's arguments; fairseq also applies them over the param groups of a
        loaded checkpoint, so the flags (kernel choice included) win over the
        checkpoint's."""
        lr = self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr
        betas = self.cfg.adam_betas
        if isinstance(betas, str):
            betas = ast.literal_eval(betas)
        elif OmegaConf.is_config(betas):
            betas = OmegaConf.to_container(betas)
        return {"lr": lr, "betas": tuple(betas), "eps": self.cfg.adam_eps,
                "weight_decay": self.cfg.weight_decay,
                "fused": self.impl == "fused", "foreach": self.impl == "foreach"}

    @property
    def supports_flat_params(self):
        return True
