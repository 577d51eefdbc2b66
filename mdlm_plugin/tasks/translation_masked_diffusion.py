"""fairseq task ``translation_masked_diffusion``: conditional masked diffusion on
bilingual data (``fairseq-preprocess --source-lang S --target-lang T
--joined-dictionary``), fairseq's ``translation`` task with:

* the ``<mask>`` symbol appended to the joined dictionary (one table for both
  sides: the ``mdlm_translation`` model reads ``[target canvas ; source]``);
* the forward process, the evaluation protocol (``--eval-passes``, ``--eval-seed``)
  and the samplers of :class:`DiffusionOptions`, as for ``masked_diffusion``;
* ``bound_input``: what the bound criteria (``--criterion mdlm``) score, the
  target canvas given the source (``diffusion/conditional.py``), normalised per
  target token (its ``</s>`` included; the ``</s>`` filler after it is scored, as
  part of the target's length, but not counted);
* fairseq-generate / fairseq-interactive through ``generator.TranslationGenerator``.

Bad input is one ``MDLMUserError``: monolingual (``--only-source``) data, separate
source and target dictionaries, and (outside training, where fairseq skips them
with a warning) sentences longer than the model's positions.
"""

import logging
import os
from dataclasses import dataclass

from fairseq import utils
from fairseq.data import Dictionary, data_utils
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from ..diffusion.conditional import ConditionalInputError, strip_padding, training_input
from ..errors import MDLMUserError
from .masked_diffusion import (BoundInput, DiffusionOptions, DiffusionTaskMixin,
                               add_mask_symbol, check_binarized_split, diffusion_setup,
                               first_data_dir)

logger = logging.getLogger(__name__)


@dataclass
class TranslationMaskedDiffusionConfig(TranslationConfig, DiffusionOptions):
    seed: int = II("common.seed")


@register_task("translation_masked_diffusion", dataclass=TranslationMaskedDiffusionConfig)
class TranslationMaskedDiffusionTask(DiffusionTaskMixin, TranslationTask):

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.args = cfg            # what the bound criteria and the generator read
        self.mask_index, self.schedule = diffusion_setup(cfg, src_dict)

    @staticmethod
    def generator_class():
        from ..generator import TranslationGenerator
        return TranslationGenerator

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        data_dir = first_data_dir(cfg.data, "data-bin/bible_ja_en")
        if cfg.source_lang is None or cfg.target_lang is None:
            cfg.source_lang, cfg.target_lang = data_utils.infer_language_pair(data_dir)
        if cfg.source_lang is None or cfg.target_lang is None:
            mono = os.path.isfile(os.path.join(data_dir, "dict.txt"))
            raise MDLMUserError(
                f"{data_dir!r} holds no bilingual data (no train.SRC-TGT.SRC files)"
                + (": its dict.txt is monolingual data (fairseq-preprocess --only-source), "
                   "for --task masked_diffusion" if mono else "")
                + "; binarize a parallel corpus with fairseq-preprocess --source-lang S "
                  "--target-lang T --joined-dictionary (see examples/bible/prepare.sh)")
        dicts = []
        for lang in (cfg.source_lang, cfg.target_lang):
            path = os.path.join(data_dir, f"dict.{lang}.txt")
            if not os.path.isfile(path):
                raise MDLMUserError(f"no dict.{lang}.txt in {data_dir!r}: the data must be "
                                    f"fairseq-preprocess output for --source-lang "
                                    f"{cfg.source_lang} --target-lang {cfg.target_lang}")
            dicts.append(Dictionary.load(path))
        if dicts[0].symbols != dicts[1].symbols:
            raise MDLMUserError(
                f"dict.{cfg.source_lang}.txt ({len(dicts[0])} symbols) and "
                f"dict.{cfg.target_lang}.txt ({len(dicts[1])} symbols) differ: the model "
                f"embeds source and target with one table; binarize with fairseq-preprocess "
                f"--joined-dictionary")
        dictionary = dicts[0]
        add_mask_symbol(dictionary)
        logger.info("joined dictionary: %d types (with <mask>)", len(dictionary))
        return cls(cfg, dictionary, dictionary)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        pair = f"{self.cfg.source_lang}-{self.cfg.target_lang}"
        for lang in (self.cfg.source_lang, self.cfg.target_lang):
            check_binarized_split(os.path.join(paths[(epoch - 1) % len(paths)],
                                               f"{split}.{pair}.{lang}"))
        try:
            return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        except FileNotFoundError as e:
            raise MDLMUserError(f"{e}: binarize the '{split}' split with fairseq-preprocess "
                                f"(--trainpref/--validpref/--testpref)") from None

    def filter_indices_by_size(self, indices, dataset, max_positions=None,
                               ignore_invalid_inputs=False):
        """fairseq's filter, with one clear error for a sentence that does not fit
        (validation, generation) instead of fairseq's generic one."""
        kept, ignored = dataset.filter_indices_by_size(indices, max_positions)
        if len(ignored) and not ignore_invalid_inputs:
            src, tgt = dataset.size(ignored[0])
            raise MDLMUserError(
                f"{len(ignored)} sentence pair(s) do not fit the model, the first "
                f"(#{ignored[0]}) has a {src}-token source and a {tgt}-token target (with "
                f"</s>); the model takes sources of at most {max_positions[0]} and targets "
                f"of at most {max_positions[1]} tokens (--max-positions minus "
                f"--target-canvas, and --target-canvas); pass "
                f"--skip-invalid-size-inputs-valid-test to leave them out")
        if len(ignored):
            logger.warning("%d sentence pairs longer than the model's (source, target) "
                           "positions %s are skipped", len(ignored), max_positions)
        return kept

    def bound_input(self, sample, model):
        """``[target canvas ; source]``, the source and the padding not scored, and the
        number of target tokens (with their ``</s>``) as the normaliser; whether the
        layout has padding is left to the model to test."""
        pad, eos = self.target_dictionary.pad(), self.target_dictionary.eos()
        sources = strip_padding(sample["net_input"]["src_tokens"], pad)
        targets = strip_padding(sample["target"], pad)
        try:
            x, not_scored = training_input(sources, targets, model.canvas, eos, pad,
                                           model.cfg.max_positions)
        except ConditionalInputError as e:
            raise MDLMUserError(f"{e} (--target-canvas {model.canvas}, --max-positions "
                                f"{model.cfg.max_positions})") from None
        return BoundInput(x, not_scored, sum(t.numel() for t in targets))
