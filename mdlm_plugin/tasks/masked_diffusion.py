"""fairseq task ``masked_diffusion``: language-modelling data for a masked diffusion LM.

Reads ``fairseq-preprocess --only-source`` output exactly as fairseq's
``language_modeling`` task does (same flags: ``--tokens-per-sample``,
``--sample-break-mode none|complete|complete_doc|eos``, ...), and adds:

* the ``<mask>`` symbol, appended to the dictionary in ``setup_dictionary`` (the one
  path every entry point takes: fairseq-train/-validate/-generate/-interactive and
  ``from_pretrained``), so its index is ``len(dict.txt symbols)`` everywhere;
* the noise schedule of the forward process (``--noise-schedule``), shared by the
  criterion (the loss) and the generator (sampling);
* ``uses_ema``: with ``--store-ema`` validation reports the EMA weights' bound.

BOS/EOS: fairseq-preprocess ends every input line with ``</s>``; those tokens are
data and are modelled (and corrupted) like any other token. The MDLM sample is the
task's ``target`` (the original block); padding is never masked, never attended to
and never counted. ``--add-bos-token`` only affects the shifted ``src_tokens`` that
MDLM does not read.
"""

import logging
import os
from dataclasses import dataclass, field

from fairseq.data import Dictionary
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import FairseqTask, register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq import utils

from ..diffusion.schedules import SCHEDULES, build_schedule
from ..errors import MDLMUserError

logger = logging.getLogger(__name__)

MASK_SYMBOL = "<mask>"
MAX_EVAL_PASSES = 64


@dataclass
class MaskedDiffusionConfig(LanguageModelingConfig):
    noise_schedule: ChoiceEnum(list(SCHEDULES)) = field(
        default="loglinear", metadata={"help": "forward-process noise schedule"})
    noise_eps: float = field(
        default=1e-3, metadata={"help": "eps of the loglinear/cosine schedules "
                                        "(alpha_1 = eps)"})
    sigma_min: float = field(default=1e-3, metadata={"help": "linear/geometric: sigma(0)"})
    sigma_max: float = field(default=7.0, metadata={"help": "linear/geometric: sigma(1)"})
    eval_passes: int = field(
        default=1, metadata={"help": f"evaluation: average K Monte-Carlo passes of the bound "
                                     f"over each batch (K >= 2 also reports its standard "
                                     f"error; at most {MAX_EVAL_PASSES})"})
    eval_seed: int = field(
        default=1, metadata={"help": "evaluation: seed of the times and masks drawn, so a "
                                     "checkpoint's bound is reproducible"})


def add_mask_symbol(dictionary: Dictionary) -> int:
    """Append <mask> (idempotent); the single place the symbol is added."""
    return dictionary.add_symbol(MASK_SYMBOL)


@register_task("masked_diffusion", dataclass=MaskedDiffusionConfig)
class MaskedDiffusionTask(LanguageModelingTask):

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self.mask_index = dictionary.index(MASK_SYMBOL) if dictionary is not None else None
        if not 1 <= args.eval_passes <= MAX_EVAL_PASSES:
            raise MDLMUserError(f"--eval-passes must be in [1, {MAX_EVAL_PASSES}], "
                                f"got {args.eval_passes}")
        self.schedule = build_schedule(str(args.noise_schedule), eps=args.noise_eps,
                                       sigma_min=args.sigma_min, sigma_max=args.sigma_max)

    @classmethod
    def setup_dictionary(cls, args, **kwargs):
        if not args.data:
            raise MDLMUserError("no data directory given: pass the fairseq-preprocess "
                                "output directory (e.g. data-bin/ptb) as the first argument")
        data_dir = utils.split_paths(args.data)[0]
        dict_path = os.path.join(data_dir, "dict.txt")
        if not os.path.isfile(dict_path):
            raise MDLMUserError(
                f"no dict.txt in {data_dir!r}: the data directory must be the output of "
                f"`fairseq-preprocess --only-source ... --destdir DIR` "
                f"(see examples/ptb/prepare.sh)")
        if args.output_dictionary_size >= 0:
            raise MDLMUserError("--output-dictionary-size is not supported by masked "
                                "diffusion: the denoiser predicts the full vocabulary")
        dictionary = Dictionary.load(dict_path)
        add_mask_symbol(dictionary)
        logger.info("dictionary: %d types (with %s)", len(dictionary), MASK_SYMBOL)
        return dictionary, dictionary

    def build_model(self, args, from_checkpoint=False):
        model = FairseqTask.build_model(self, args, from_checkpoint)
        limit = model.max_positions() if hasattr(model, "max_positions") else None
        if isinstance(limit, int) and self.args.tokens_per_sample > limit:
            raise MDLMUserError(
                f"--tokens-per-sample {self.args.tokens_per_sample} exceeds the model's "
                f"{limit} positions: lower --tokens-per-sample or raise --max-positions")
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        try:
            return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        except FileNotFoundError as e:
            raise MDLMUserError(
                f"{e}: the data directory has no binarized '{split}' split; binarize it "
                f"with fairseq-preprocess (--trainpref/--validpref/--testpref)") from None

    @property
    def uses_ema(self):
        return True

    def train_step(self, sample, model, criterion, optimizer, update_num,
                   ignore_grad=False, **kwargs):
        # the trainer passes ema_model= when --store-ema is on; training ignores it
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion, ema_model=None, **kwargs):
        """Validation scores the EMA weights when fairseq keeps them (--store-ema)."""
        return super().valid_step(sample, ema_model if ema_model is not None else model,
                                  criterion)
