"""fairseq criterion ``mdlm``: where the loss is.

One Monte-Carlo draw of MDLM's continuous-time (or T-step discrete-time)
Rao-Blackwellized NELBO per batch, computed by ``diffusion.objective.nelbo`` (per
block for a block-diffusion model, ``diffusion.blocks.block_nelbo``);
this file only adapts fairseq's sample/model to it and does the bookkeeping.

Units: the logged ``loss`` is in bits per (non-pad) token, so fairseq's ``ppl``
column, 2^loss, is the perplexity upper bound. In evaluation (model.eval()) the
criterion draws times and masks from its own generator seeded by the task's
``--eval-seed`` and the batch's sample ids, and averages ``--eval-passes`` K draws;
so two runs on the same checkpoint print the same bound, and with K >= 2 the
split-level standard error across passes is logged as ``bound_se`` (bits) and
``ppl_se`` (perplexity, delta method).

In training the times and masks of a micro-batch come from a generator seeded by
(``--seed``, the update number, the micro-batch's first sample id), not from the
global torch stream: the noise of a micro-batch is then the same whichever process
or micro-batch slot computes it, so W gloo/NCCL ranks give the same update as one
process with ``--update-freq W``, and a resumed run draws what the uninterrupted
one would have.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..diffusion.blocks import block_nelbo, check_mask_rate
from ..errors import MDLMUserError
from ..tasks.masked_diffusion import MAX_EVAL_PASSES


@dataclass
class MDLMCriterionConfig(FairseqDataclass):
    discrete_steps: int = field(
        default=0, metadata={"help": "T > 0: the discrete-time (T-step) bound instead of the "
                                     "continuous-time one (T = 0); always >= the latter"})
    time_sampling: ChoiceEnum(["antithetic", "iid"]) = field(
        default="antithetic",
        metadata={"help": "antithetic: low-discrepancy t over the batch (lower variance)"})
    sampling_eps: float = field(
        default=1e-3, metadata={"help": "continuous t is drawn from [eps, 1]"})
    train_mask_rate: Optional[List[float]] = field(
        default=None,
        metadata={"help": "LOW HIGH: training draws mask rates in [LOW, HIGH] (block "
                          "diffusion's clipped schedule; lower variance). Evaluation "
                          "always reports the full bound over [0, 1]"})


@register_criterion("mdlm", dataclass=MDLMCriterionConfig)
class MDLMCriterion(FairseqCriterion):
    def __init__(self, task, discrete_steps=0, time_sampling="antithetic", sampling_eps=1e-3,
                 train_mask_rate=None):
        super().__init__(task)
        self.train_mask_rate = None
        if train_mask_rate is not None:
            try:
                self.train_mask_rate = check_mask_rate(train_mask_rate)
            except ValueError as e:
                raise MDLMUserError(f"--train-mask-rate: {e}") from None
            if discrete_steps > 0:
                raise MDLMUserError("--train-mask-rate is a continuous-time training "
                                    "objective: leave out --discrete-steps with it")
        if getattr(task, "mask_index", None) is None:
            raise MDLMUserError("--criterion mdlm needs --task masked_diffusion")
        if discrete_steps < 0:
            raise MDLMUserError(f"--discrete-steps must be >= 0 (0 = continuous time), "
                                f"got {discrete_steps}")
        if not 0.0 <= sampling_eps < 1.0:
            raise MDLMUserError(f"--sampling-eps must be in [0, 1), got {sampling_eps}")
        self.discrete_steps = discrete_steps
        self.antithetic = str(time_sampling) == "antithetic"
        self.sampling_eps = sampling_eps
        # the evaluation protocol (passes, seed) belongs to the task, so that
        # fairseq-validate accepts it without --criterion
        self.eval_passes = task.args.eval_passes
        self.eval_seed = task.args.eval_seed
        self.train_seed = getattr(task.args, "seed", 1)
        self.num_updates = 0

    @classmethod
    def add_args(cls, parser):
        """fairseq's flags, with --train-mask-rate as two numbers (LOW HIGH)."""
        super().add_args(parser)
        for action in parser._actions:
            if "--train-mask-rate" in action.option_strings:
                action.nargs, action.type, action.metavar = 2, float, ("LOW", "HIGH")

    def set_num_updates(self, num_updates):
        """The update being computed (the task's train_step passes it): part of the
        key of the training noise."""
        self.num_updates = num_updates

    def _eval_generator(self, sample, device):
        g = torch.Generator(device=device)
        first_id = int(sample["id"].min()) if "id" in sample else 0
        g.manual_seed(self.eval_seed * 1_000_003 + first_id)
        return g

    def _train_generator(self, sample, device):
        """Training noise keyed by (seed, update, first sample id of the micro-batch):
        independent of the rank and of the micro-batch's slot in --update-freq."""
        first_id = int(sample["id"].min()) if "id" in sample else 0
        key = [self.train_seed % 2 ** 63, self.num_updates, first_id]
        seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, model, sample, reduce=True):
        x = sample["target"]
        pad_mask = x.eq(self.padding_idx)
        evaluating = not model.training
        passes = self.eval_passes if evaluating else 1
        generator = (self._eval_generator if evaluating else self._train_generator)(
            sample, x.device)
        block_size = getattr(model, "block_size", None)
        denoiser = model.denoiser(clean=x) if block_size else model.denoiser()
        mask_rate = None if evaluating else self.train_mask_rate   # eval: the full bound

        losses, n_masked = [], 0
        for _ in range(passes):
            terms = block_nelbo(denoiser, x, self.task.schedule, self.task.mask_index,
                                pad_mask, block_size=block_size, mask_rate=mask_rate,
                                discrete_steps=self.discrete_steps,
                                antithetic=self.antithetic, eps_t=self.sampling_eps,
                                generator=generator)
            losses.append(terms.loss)
            n_masked += terms.n_masked
        loss = torch.stack(losses).mean()
        ntokens = terms.n_tokens
        logging_output = {
            "loss": loss.detach().item(),
            "ntokens": ntokens,
            "nsentences": x.size(0),
            "sample_size": ntokens,
            "nmasked": n_masked / passes,
        }
        if passes > 1:
            for k, pass_loss in enumerate(losses):
                logging_output[f"_pass{k}"] = pass_loss.detach().item()
        return loss, ntokens, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        loss_sum, ntokens = total("loss"), total("ntokens")
        metrics.log_scalar("loss", loss_sum / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_scalar("mask_frac", total("nmasked") / max(ntokens, 1), ntokens, round=3)
        metrics.log_derived("ppl", lambda m: 2 ** m["loss"].avg if m["loss"].count else 0.0)

        passes = [k for k in range(MAX_EVAL_PASSES) if f"_pass{k}" in logging_outputs[0]] \
            if logging_outputs else []
        if passes:
            metrics.log_scalar_sum("scored_tokens", ntokens)
            for k in passes:
                metrics.log_scalar_sum(f"_pass{k}", total(f"_pass{k}"))
            metrics.log_derived("bound_se", lambda m: _pass_stderr(m, passes)[0])
            metrics.log_derived("ppl_se", lambda m: _pass_stderr(m, passes)[1])

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # Every value is a count or a sum, and all outputs of one phase carry the same
        # keys (the per-pass keys in every evaluation output, never in training), so
        # fairseq may sum them across micro-batches and workers. This is also what lets
        # gloo work: the other path (all_gather_list) allocates a CUDA buffer.
        return True


def _pass_stderr(meters, passes):
    """Standard error (bits/token, and perplexity by the delta method) of the mean
    over K passes of the split-level bound."""
    n = max(meters["scored_tokens"].sum, 1)
    per_pass = [meters[f"_pass{k}"].sum / n / math.log(2) for k in passes]
    mean = sum(per_pass) / len(per_pass)
    var = sum((b - mean) ** 2 for b in per_pass) / (len(per_pass) - 1)
    se_bits = math.sqrt(var / len(per_pass))
    return round(se_bits, 4), round(se_bits * math.log(2) * 2 ** mean, 3)
