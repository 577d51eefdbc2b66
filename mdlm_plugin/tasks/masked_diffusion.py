"""fairseq task ``masked_diffusion``: language-modelling data for a masked diffusion LM.

Reads ``fairseq-preprocess --only-source`` output exactly as fairseq's
``language_modeling`` task does (same flags: ``--tokens-per-sample``,
``--sample-break-mode none|complete|complete_doc|eos``, ...), and adds:

* the ``<mask>`` symbol, appended to the dictionary in ``setup_dictionary`` (the one
  path every entry point takes: fairseq-train/-validate/-generate/-interactive and
  ``from_pretrained``), so its index is ``len(dict.txt symbols)`` everywhere;
* the noise schedule of the forward process (``--noise-schedule``), shared by the
  criterion (the loss) and the generator (sampling);
* ``uses_ema``: with ``--store-ema`` validation reports the EMA weights' bound;
* sampling with fairseq-generate / fairseq-interactive (``build_generator``,
  ``inference_step``, ``build_dataset_for_inference``): the flags ``--sampler``,
  ``--steps``, ``--gen-length`` and ``--semi-ar-stride`` are fields of this config;
  the generator itself is ``mdlm_plugin/generator.py``, which documents the inputs
  (prompts, ``<mask>`` infilling templates) and the hypotheses it returns.

BOS/EOS: fairseq-preprocess ends every input line with ``</s>``; those tokens are
data and are modelled (and corrupted) like any other token. The MDLM sample is the
task's ``target`` (the original block); padding is never masked, never attended to
and never counted. ``--add-bos-token`` is refused (one error at task setup): fairseq's
``MonolingualDataset`` would put ``<s>`` at the head of every target, so the bound
would score a free token per block that ``fairseq-eval-lm`` strips from AR models;
without it MDLM and the AR baselines score exactly the same tokens.
"""

import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch
from fairseq.data import (BaseWrapperDataset, Dictionary, IdDataset, ListDataset,
                          NestedDictionaryDataset, NumelDataset, PadDataset)
from fairseq.data import indexed_dataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq import utils

from ..diffusion.samplers import COMMIT_SCHEDULES, REMDM_STRATEGIES, SAMPLERS
from ..diffusion.schedules import SCHEDULES, build_schedule
from ..errors import MDLMUserError

logger = logging.getLogger(__name__)

MASK_SYMBOL = "<mask>"
MAX_EVAL_PASSES = 64
# "<mask>" (one position to fill) or "<mask>*N" (N positions) in an input line
MASK_SPAN = re.compile(re.escape(MASK_SYMBOL) + r"(?:\*(\d+))?")


DEFAULT_WINDOW = 1024      # language_modeling's --tokens-per-sample default


@dataclass
class DiffusionOptions(FairseqDataclass):
    """The flags every masked-diffusion task shares (``masked_diffusion`` and
    ``translation_masked_diffusion``): the forward process, the evaluation protocol
    of the bound and the samplers."""
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
    sampler: ChoiceEnum(list(SAMPLERS)) = field(
        default="ddpm_cache",
        metadata={"help": "generation: ddpm (ancestral), ddpm_cache (reruns a row only "
                          "after a step changed it), analytic, first_hitting (one token "
                          "per step and row), remdm (remasking), confidence (commits the "
                          "most confident); ddpm_cache and first_hitting need a model "
                          "without time conditioning"})
    steps: int = field(
        default=128, metadata={"help": "generation: diffusion steps (per window)"})
    remdm_strategy: ChoiceEnum(list(REMDM_STRATEGIES)) = field(
        default="cap", metadata={"help": "generation, remdm: remasking probability sigma_t: "
                                         "cap min(eta, sigma_max), rescale eta sigma_max, "
                                         "conf by the token's probability when drawn"})
    remdm_eta: Optional[float] = field(
        default=None, metadata={"help": "generation, remdm: eta (0: the ddpm step; default: "
                                        "the reference script's, cap 0.008, rescale 0.015, "
                                        "loop 0.02)"})
    remdm_loop: bool = field(
        default=False, metadata={"help": "generation, remdm: remask with sigma = eta only "
                                         "for t in (t_off, t_on], at alpha held at "
                                         "alpha_on (the reference's remdm-loop; no "
                                         "strategy)"})
    remdm_t_on: float = field(default=0.55, metadata={"help": "generation, remdm loop: t_on"})
    remdm_t_off: float = field(default=0.05, metadata={"help": "generation, remdm loop: t_off"})
    remdm_alpha_on: float = field(
        default=0.9, metadata={"help": "generation, remdm loop: alpha held in the loop"})
    commit_schedule: ChoiceEnum(list(COMMIT_SCHEDULES)) = field(
        default="cosine", metadata={"help": "generation, confidence: how many masked "
                                            "positions stay masked after each step"})
    commit_per_step: int = field(
        default=0, metadata={"help": "generation, confidence: commit K positions per step "
                                     "instead of the schedule (0: the schedule)"})
    confidence_noise: float = field(
        default=0.0, metadata={"help": "generation, confidence: temperature of the Gumbel "
                                       "noise added to the confidence (0: none)"})


@dataclass
class MaskedDiffusionConfig(LanguageModelingConfig, DiffusionOptions):
    tokens_per_sample: int = field(
        default=0, metadata={"help": f"tokens per sample (a block of text); also the sampling "
                                     f"window. 0 (not given): {DEFAULT_WINDOW} for training; "
                                     f"fairseq-generate/-interactive take the checkpoint's"})
    gen_length: int = field(
        default=0, metadata={"help": "generation: tokens per sample, prompt included "
                                     "(0: --tokens-per-sample). Longer than the window "
                                     "(--tokens-per-sample, at most the model's positions) "
                                     "is generated semi-autoregressively"})
    semi_ar_stride: int = field(
        default=0, metadata={"help": "generation: semi-autoregressive sampling, S new "
                                     "tokens per window after the first (the window's other "
                                     "tokens are the previous ones, fixed). 0: only when "
                                     "--gen-length exceeds the window, with S = window/2"})
    stop_at_eos: bool = field(
        default=False, metadata={"help": "generation, block-diffusion models: end a "
                                         "continuation at the first </s> it generates "
                                         "(else at --gen-length)"})


def check_binarized_split(split_path: str) -> None:
    """A truncated ``.bin``, or an ``.idx`` that does not describe its ``.bin``, is one
    clear error when the split is loaded, before any step (fairseq itself would read
    past the end mid-epoch or train on misaligned tokens)."""
    idx, data = indexed_dataset.index_file_path(split_path), indexed_dataset.data_file_path(split_path)
    if not (os.path.isfile(idx) and os.path.isfile(data)):
        return                                   # a missing split is reported by load_dataset
    if indexed_dataset.infer_dataset_impl(split_path) != "mmap":
        return                                   # fairseq-preprocess writes mmap by default
    try:
        index = indexed_dataset.MMapIndexedDataset.Index(idx)
        n = len(index)
        pointer, size = index[n - 1] if n else (0, 0)
        expected = int(pointer) + int(size) * np.dtype(index.dtype).itemsize
    except (AssertionError, ValueError, KeyError, struct.error) as e:
        raise MDLMUserError(f"{idx} is not a readable fairseq index ({e}): re-run "
                            f"fairseq-preprocess for this split") from None
    actual = os.path.getsize(data)
    if actual != expected:
        raise MDLMUserError(
            f"{data} has {actual:,} bytes but its index {idx} describes {expected:,}: the .bin "
            f"is truncated or the .idx was written for other data; re-run fairseq-preprocess "
            f"for this split")


class BoundInput(NamedTuple):
    """What a bound criterion scores (``bound_input``): the clean sequences ``x``
    (B, L); ``not_scored``, the positions left out of the bound (never masked, never
    counted), or None when there are none; ``n_scored``, the token count the bound is
    normalised by (None: every scored position, counted on the device); ``padded``,
    whether ``x`` holds padding, when that is known on the host (None: the model
    tests it). Known on the host, the counts and the padding cost no device-to-host
    read in the training step."""
    x: torch.Tensor
    not_scored: Optional[torch.Tensor]
    n_scored: Optional[int]
    padded: Optional[bool] = None


class FirstIdDataset(BaseWrapperDataset):
    """A split whose batches also carry ``first_id``, the smallest sample id of the
    batch as a Python int. The bound criteria key their noise by it; read off the
    batch's ``id`` tensor once the batch is on a GPU, it would cost a device-to-host
    read in every step."""

    def collater(self, samples):
        batch = super().collater(samples)
        if samples and batch:
            batch["first_id"] = min(int(s["id"]) for s in samples)
        return batch


def first_data_dir(data, example: str) -> str:
    """The directory the dictionaries are read from: the first of ``--data``'s
    ``DIR1:DIR2`` shards; one error when none is given."""
    if not data:
        raise MDLMUserError(f"no data directory given: pass the fairseq-preprocess output "
                            f"directory (e.g. {example}) as the first argument")
    return utils.split_paths(data)[0]


def diffusion_setup(args, dictionary):
    """(mask index, noise schedule) of a task from its :class:`DiffusionOptions`;
    checks --eval-passes."""
    mask_index = dictionary.index(MASK_SYMBOL) if dictionary is not None else None
    if not 1 <= args.eval_passes <= MAX_EVAL_PASSES:
        raise MDLMUserError(f"--eval-passes must be in [1, {MAX_EVAL_PASSES}], "
                            f"got {args.eval_passes}")
    schedule = build_schedule(str(args.noise_schedule), eps=args.noise_eps,
                              sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    return mask_index, schedule


def add_mask_symbol(dictionary: Dictionary) -> int:
    """Append <mask> (idempotent); the single place the symbol is added."""
    return dictionary.add_symbol(MASK_SYMBOL)


class DiffusionTaskMixin:
    """What every masked-diffusion task does the same way: EMA validation, the
    training-noise key, and generation through a generator of ``generator.py``
    (``generator_class``)."""

    @staticmethod
    def generator_class():
        from ..generator import MaskedDiffusionGenerator
        return MaskedDiffusionGenerator

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's batching with --required-batch-size-multiple > 1 (default 8) leaves
        out up to 7 examples at the end of a split when --batch-size is not a multiple
        of it; a bound must score every token of the split and fairseq-generate must
        answer every input, so batches here are never rounded. (fairseq's signature:
        dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
        required_batch_size_multiple, ...)"""
        if len(args) >= 5:
            args = args[:4] + (1,) + args[5:]
        else:
            kwargs["required_batch_size_multiple"] = 1
        return super().get_batch_iterator(dataset, *args, **kwargs)

    @property
    def uses_ema(self):
        return True

    def train_step(self, sample, model, criterion, optimizer, update_num,
                   ignore_grad=False, **kwargs):
        # the trainer passes ema_model= when --store-ema is on; training ignores it
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)    # keys the criterion's training noise
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion, ema_model=None, **kwargs):
        """Validation scores the EMA weights when fairseq keeps them (--store-ema)."""
        return super().valid_step(sample, ema_model if ema_model is not None else model,
                                  criterion)

    # ------------------------------------------------------------------ generation

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        """The masked-diffusion sampler behind fairseq-generate / fairseq-interactive
        (see ``mdlm_plugin/generator.py``); ``args`` is fairseq's generation config."""
        unsupported = [
            ("--lm-path", (extra_gen_cls_kwargs or {}).get("lm_model") is not None),
            ("--score-reference (use fairseq-validate for the likelihood bound)",
             getattr(args, "score_reference", False)),
            ("--constraints", bool(getattr(args, "constraints", None))),
            ("prefix_allowed_tokens_fn", prefix_allowed_tokens_fn is not None),
        ]
        for flag, used in unsupported:
            if used:
                raise MDLMUserError(f"{flag} is not supported by masked diffusion sampling")
        return self.generator_class().from_task(self, models, args)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Data splits (fairseq-generate): ``--prefix-size K`` fixes the first K target
        tokens, K = 0 samples unconditionally. Inference datasets (fairseq-interactive):
        each input is a prompt or an infilling template."""
        if constraints is not None:
            raise MDLMUserError("--constraints is not supported by masked diffusion sampling")
        with torch.no_grad():
            return generator.generate(models, sample, prefix_tokens=prefix_tokens)


@register_task("masked_diffusion", dataclass=MaskedDiffusionConfig)
class MaskedDiffusionTask(DiffusionTaskMixin, LanguageModelingTask):

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        if getattr(args, "add_bos_token", False):
            raise MDLMUserError(
                "--add-bos-token is not supported by --task masked_diffusion: it puts <s> "
                "at the head of every target block, a free token the bound would score "
                "(fairseq-eval-lm leaves it out for AR models); drop the flag, and train "
                "the AR baselines without it to compare like for like")
        # the window given on the command line wins; otherwise a checkpoint's (its task
        # state records it, see load_state_dict), else the default
        self.window_given = args.tokens_per_sample > 0
        if not self.window_given:
            args.tokens_per_sample = DEFAULT_WINDOW
        super().__init__(args, dictionary, output_dictionary, targets)
        self.state.merge_state_dict({"tokens_per_sample": args.tokens_per_sample})
        self.mask_index, self.schedule = diffusion_setup(args, dictionary)

    @classmethod
    def setup_dictionary(cls, args, **kwargs):
        data_dir = first_data_dir(args.data, "data-bin/ptb")
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
        if isinstance(limit, int) and self.args.tokens_per_sample > limit and from_checkpoint:
            raise MDLMUserError(
                f"--tokens-per-sample {self.args.tokens_per_sample} exceeds the checkpoint's "
                f"{limit} positions: pass the --tokens-per-sample the model was trained with "
                f"(a checkpoint saved by an older version does not record it; it is also the "
                f"sampling window)")
        if isinstance(limit, int) and self.args.tokens_per_sample > limit:
            raise MDLMUserError(
                f"--tokens-per-sample {self.args.tokens_per_sample} exceeds the model's "
                f"{limit} positions: lower --tokens-per-sample or raise --max-positions")
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.args.data)
        check_binarized_split(os.path.join(paths[(epoch - 1) % len(paths)], split))
        try:
            super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        except FileNotFoundError as e:
            raise MDLMUserError(
                f"{e}: the data directory has no binarized '{split}' split; binarize it "
                f"with fairseq-preprocess (--trainpref/--validpref/--testpref)") from None
        self.datasets[split] = FirstIdDataset(self.datasets[split])
        return self.datasets[split]

    def load_state_dict(self, state_dict):
        """A checkpoint's task state (fairseq loads it before building the model): its
        --tokens-per-sample becomes the window unless one was given on the command line
        (checkpoints saved before this was recorded hold none)."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("tokens_per_sample")
        if saved and not self.window_given and saved != self.args.tokens_per_sample:
            logger.info("--tokens-per-sample %d, from the checkpoint", saved)
            self.args.tokens_per_sample = saved
        self.state.merge_state_dict({"tokens_per_sample": self.args.tokens_per_sample})

    def bound_input(self, sample, model) -> BoundInput:
        """What a bound criterion scores (:class:`BoundInput`): the clean sequences
        ``target``, the padding left out. fairseq's language-modelling batches count
        their tokens on the host (``ntokens``: each target as long as its source), so
        the batch has padding exactly when that count falls short of B x L."""
        x = sample["target"]
        n = sample.get("ntokens")
        if n is None:                           # not a fairseq batch: count on the device
            return BoundInput(x, x.eq(self.source_dictionary.pad()), None)
        padded = n != x.numel()
        return BoundInput(x, x.eq(self.source_dictionary.pad()) if padded else None, n,
                          padded)

    def get_interactive_tokens_and_lengths(self, lines, encode_fn):
        """Input lines to token ids, without the end-of-sentence symbol (a prompt is
        continued, not closed). ``<mask>`` marks one position to fill and
        ``<mask>*N`` N positions; the text between is tokenized (``encode_fn``: the
        tokenizer and BPE) piece by piece, so markers survive BPE."""
        tokens = [self._encode_input_line(line, encode_fn) for line in lines]
        return tokens, [t.numel() for t in tokens]

    def _encode_input_line(self, line, encode_fn):
        pieces, start = [], 0
        for m in MASK_SPAN.finditer(line):
            pieces.append(self._encode_text(line[start:m.start()], encode_fn))
            n = 1 if m.group(1) is None else int(m.group(1))
            if n < 1:
                raise MDLMUserError(f"{m.group(0)!r} in input line {line!r}: the number of "
                                    f"positions to fill must be >= 1")
            pieces.append(torch.full((n,), self.mask_index, dtype=torch.long))
            start = m.end()
        pieces.append(self._encode_text(line[start:], encode_fn))
        return torch.cat(pieces)

    def _encode_text(self, text, encode_fn):
        if not text.strip():
            return torch.empty(0, dtype=torch.long)
        return self.source_dictionary.encode_line(
            encode_fn(text.strip()), add_if_not_exist=False, append_eos=False).long()

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        """Prompts/templates as given: no eos appended, no bos prepended (unlike
        language_modeling, which conditions on a leading eos). ``src_tokens`` of the
        batch are the inputs, right-padded. The sizes fairseq batches and filters by
        are clipped to the window (--tokens-per-sample): a prompt's cost is at most a
        window per step, and the generator itself reports inputs that do not fit."""
        sizes = np.clip(np.asarray(src_lengths, dtype=np.int64), 1, self.args.tokens_per_sample)
        inputs = ListDataset(src_tokens, sizes)
        return NestedDictionaryDataset(
            {
                "id": IdDataset(),
                "net_input": {
                    "src_tokens": PadDataset(inputs, pad_idx=self.source_dictionary.pad(),
                                             left_pad=False),
                    "src_lengths": NumelDataset(inputs, reduce=False),
                },
            },
            sizes=[sizes],
        )
