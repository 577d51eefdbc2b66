"""What every likelihood-bound criterion of the plugin shares (``mdlm``, ``sedd``):
the noise generators, the evaluation protocol and the bookkeeping. A subclass only
says how one Monte-Carlo draw of its bound is computed (``draw``).

Units: the logged ``loss`` is in bits per (non-pad) token, so fairseq's ``ppl``
column, 2^loss, is the perplexity upper bound. In evaluation (model.eval()) the
criterion draws times and masks from its own generator seeded by the task's
``--eval-seed`` and the batch's sample ids, and averages ``--eval-passes`` K draws;
so two runs on the same checkpoint print the same bound. Evaluation also logs
``scored_tokens``, the exact number of tokens the bound covers (printed as an integer
string: fairseq prints every number with 6 significant digits, so a count above
10^6 would read rounded), and with K >= 2 the split-level standard error across
passes as ``bound_se`` (bits) and ``ppl_se`` (perplexity, delta method).

In training the times and masks of a micro-batch come from a generator seeded by
(``--seed``, the update number, the micro-batch's first sample id), not from the
global torch stream: the noise of a micro-batch is then the same whichever process
or micro-batch slot computes it, so W gloo/NCCL ranks give the same update as one
process with ``--update-freq W``, and a resumed run draws what the uninterrupted
one would have.

No device-to-host read in a training step but the denoiser's one count of the masked
positions (``docs/gpu.md``): the batch's token count, its padding and its first sample
id come from the host (``bound_input``, the collater's ``first_id``), and the training
logging outputs hold the loss as a tensor, which fairseq sums across micro-batches and
workers and this criterion reads in ``reduce_metrics``, after the optimizer step.
Evaluation logs Python numbers (fairseq-validate gathers its outputs as pickles).
"""

import abc
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..errors import MDLMUserError
from ..tasks.masked_diffusion import MAX_EVAL_PASSES


@dataclass
class BoundCriterionConfig(FairseqDataclass):
    time_sampling: ChoiceEnum(["antithetic", "iid"]) = field(
        default="antithetic",
        metadata={"help": "antithetic: low-discrepancy t over the batch (lower variance)"})
    sampling_eps: float = field(
        default=1e-3, metadata={"help": "continuous t is drawn from [eps, 1]"})


class DiffusionBoundCriterion(FairseqCriterion, abc.ABC):
    """Base of the bound criteria; subclasses implement ``draw``."""

    name = "bound"

    def __init__(self, task, time_sampling="antithetic", sampling_eps=1e-3):
        super().__init__(task)
        if getattr(task, "mask_index", None) is None:
            raise MDLMUserError(f"--criterion {self.name} needs --task masked_diffusion")
        if not 0.0 <= sampling_eps < 1.0:
            raise MDLMUserError(f"--sampling-eps must be in [0, 1), got {sampling_eps}")
        self.antithetic = str(time_sampling) == "antithetic"
        self.sampling_eps = sampling_eps
        # the evaluation protocol (passes, seed) belongs to the task, so that
        # fairseq-validate accepts it without --criterion
        self.eval_passes = task.args.eval_passes
        self.eval_seed = task.args.eval_seed
        self.train_seed = getattr(task.args, "seed", 1)
        self.num_updates = 0

    @abc.abstractmethod
    def draw(self, denoiser, x, pad_mask, generator, block_size=None, training=False):
        """One Monte-Carlo draw of the bound on the batch: ``objective.NelboTerms``
        (``block_size``: the model's L' for block diffusion, None for the whole window;
        ``training``: the draw is a training one, not an evaluation)."""

    def set_num_updates(self, num_updates):
        """The update being computed (the task's train_step passes it): part of the
        key of the training noise."""
        self.num_updates = num_updates

    def _eval_generator(self, sample, device):
        g = torch.Generator(device=device)
        g.manual_seed(self.eval_seed * 1_000_003 + _first_id(sample))
        return g

    def _train_generator(self, sample, device):
        """Training noise keyed by (seed, update, first sample id of the micro-batch):
        independent of the rank and of the micro-batch's slot in --update-freq."""
        key = [self.train_seed % 2 ** 63, self.num_updates, _first_id(sample)]
        seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, model, sample, reduce=True):
        inp = self.task.bound_input(sample, model)
        x = inp.x
        evaluating = not model.training
        passes = self.eval_passes if evaluating else 1
        generator = (self._eval_generator if evaluating else self._train_generator)(
            sample, x.device)
        # padding as the host knows it; a block model's denoiser reads the clean blocks
        denoiser = model.denoiser(clean=x, padded=inp.padded)
        block_size = getattr(model, "block_size", None)

        losses, n_masked = [], 0
        for _ in range(passes):
            terms = self.draw(denoiser, x, inp.not_scored, generator, block_size=block_size,
                              training=not evaluating)
            losses.append(terms.loss)
            n_masked += terms.n_masked
        loss = torch.stack(losses).mean()
        # fairseq's batches count their tokens on the host; a batch that does not is
        # counted on the device, and its count read back
        ntokens = inp.n_scored if inp.n_scored is not None else int(terms.n_tokens)
        # training: a float64 tensor, summed as Python floats would be (no read here);
        # evaluation: the number itself
        logged = (lambda v: v.detach().item()) if evaluating else \
            (lambda v: v.detach().double())
        logging_output = {
            "loss": logged(loss),
            "ntokens": ntokens,
            "nsentences": x.size(0),
            "sample_size": ntokens,
            "nmasked": n_masked / passes,
        }
        if evaluating:                  # the per-pass sums, also for K = 1: marks evaluation
            for k, pass_loss in enumerate(losses):
                logging_output[f"_pass{k}"] = logged(pass_loss)
        return loss, ntokens, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            # training outputs hold tensors (and so does every value once fairseq has
            # summed them over workers): read as numbers here, after the optimizer step
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        loss_sum, ntokens = total("loss"), total("ntokens")
        metrics.log_scalar("loss", loss_sum / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_scalar("mask_frac", total("nmasked") / max(ntokens, 1), ntokens, round=3)
        metrics.log_derived("ppl", lambda m: 2 ** m["loss"].avg if m["loss"].count else 0.0)

        passes = [k for k in range(MAX_EVAL_PASSES) if f"_pass{k}" in logging_outputs[0]] \
            if logging_outputs else []
        if passes:
            metrics.log_scalar_sum("_scored_tokens", ntokens)
            metrics.log_derived("scored_tokens", lambda m: str(int(m["_scored_tokens"].sum)))
        if len(passes) > 1:
            for k in passes:
                metrics.log_scalar_sum(f"_pass{k}", total(f"_pass{k}"))
            metrics.log_derived("bound_se", lambda m: _pass_stderr(m, passes)[0])
            metrics.log_derived("ppl_se", lambda m: _pass_stderr(m, passes)[1])

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # Every value is a count or a sum (a number, or in training a 0-dim tensor), and
        # all outputs of one phase carry the same keys (the per-pass keys in every
        # evaluation output, never in training), so fairseq may sum them across
        # micro-batches (Python's sum) and workers (all_reduce_dict, which takes numbers
        # and tensors alike). This is also what lets gloo work: the other path
        # (all_gather_list) allocates a CUDA buffer.
        return True


def _first_id(sample) -> int:
    """The batch's smallest sample id: the collater's ``first_id`` (a Python int), else
    read off its ``id`` tensor (a device-to-host read), else 0."""
    if "first_id" in sample:
        return sample["first_id"]
    return int(sample["id"].min()) if "id" in sample else 0


def _pass_stderr(meters, passes):
    """Standard error (bits/token, and perplexity by the delta method) of the mean
    over K passes of the split-level bound."""
    n = max(meters["_scored_tokens"].sum, 1)
    per_pass = [meters[f"_pass{k}"].sum / n / math.log(2) for k in passes]
    mean = sum(per_pass) / len(per_pass)
    var = sum((b - mean) ** 2 for b in per_pass) / (len(per_pass) - 1)
    se_bits = math.sqrt(var / len(per_pass))
    return round(se_bits, 4), round(se_bits * math.log(2) * 2 ** mean, 3)
