"""fairseq generator for masked diffusion LMs: a thin adapter around the samplers of
``diffusion/samplers.py`` (all sampling maths lives there).

``MaskedDiffusionTask.build_generator`` returns a :class:`MaskedDiffusionGenerator`;
fairseq-generate and fairseq-interactive call it through ``task.inference_step``.

Inputs (one per input sentence; ``--nbest N`` draws N independent samples of each):

* fairseq-generate on a data split (``--gen-subset``): with ``--prefix-size K`` the
  first K tokens of the target are the prompt, with ``--prefix-size 0`` (the
  default) every input sentence yields one unconditional sample (its text is only
  printed as the T- reference);
* fairseq-interactive: each input line is a prompt, tokenized as given (no ``</s>``
  is added). An empty line asks for an unconditional sample.
* infilling (fairseq-interactive): a line containing ``<mask>`` is a template.
  ``<mask>`` is one position to fill, ``<mask>*N`` is N positions; every other token
  is given and never changes. The output has exactly the template's length (to
  continue after the given text, end the line with ``<mask>*N``). A template must
  fit one window.

A prompt (no ``<mask>``) is continued to ``--gen-length`` tokens in total (default
``--tokens-per-sample``). The window is ``--tokens-per-sample``: the task takes the
checkpoint's when none is given (see ``MaskedDiffusionTask.load_state_dict``); it is
capped at the model's positions. A ``--gen-length`` beyond the
window, or any ``--semi-ar-stride S``, samples semi-autoregressively with
``sample_semi_ar``: windows of that length, each after the first keeping its last
``window - S`` tokens fixed and generating S new ones (S defaults to window/2).

Hypotheses (what fairseq-generate prints as H-/D-/P- lines):

* ``tokens``: the sampled sequence, prompt or template tokens included, exactly
  ``--gen-length`` (or template) tokens long, never ``<mask>`` or ``<pad>``. It is a
  block of text: ``</s>`` the model generates between sentences is kept in the
  tokens, and fairseq's printing drops it, as it does for language models.
* ``positional_scores`` (natural log, fairseq prints base 2): for each position the
  sampler filled, the model's log-probability of the token it got, read from the
  network call whose output it was drawn from (x_theta under SUBS with ``<mask>``
  and ``<pad>`` excluded, at temperature 1 and without top-p, i.e. the model's own
  probability at the moment the token was unmasked); 0 for given tokens.
* ``score``: the mean of ``positional_scores`` over the filled positions (0 when
  nothing was filled).
* ``steps``: diffusion steps taken (all windows), printed with ``--print-step``;
  ``history`` (``--retain-iter-history``, not with semi-autoregressive sampling):
  the sequence before the first step and after each step, ``<mask>`` shown, then
  the final tokens if the last step left masks; ``alignment``: None.

``<pad>`` is never sampled: the model reads it as padding, so it cannot be text.
Randomness comes from one ``torch.Generator`` seeded with ``--seed``: the same
command gives the same output (the batches, and so ``--batch-size``, are part of
what is reproduced).

Statistics: ``generator.stats`` (:class:`GenerationStats`) accumulates samples,
filled tokens, network calls, seconds, unigram entropy and the share of repeated
4-grams over every batch; its
summary is logged once, when the generator is released or at exit, i.e. after
fairseq-generate and fairseq-interactive printed everything (not after an error).
A benchmark can build one from a task and a model and time the samplers::

    gen = task.build_generator([model], generation_cfg)   # or MaskedDiffusionGenerator(...)
    gen.generate_from_prompts([torch.empty(0, dtype=torch.long)] * 64)  # unconditional
    gen.stats.network_calls, gen.stats.seconds, gen.stats.mean_unigram_entropy
"""
from __future__ import annotations

import logging
import sys
import time
import weakref
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .block_generation import check_block_options, generate_block_rows
from .diffusion.samplers import (SamplerConfig, SamplerError, repeated_ngram_share, sample,
                                 sample_semi_ar, unigram_entropy)
from .diffusion.conditional import read_canvas, strip_padding
from .errors import MDLMUserError

logger = logging.getLogger(__name__)

# the task fields that configure a sampler beyond --sampler/--steps (same names as
# SamplerConfig's fields); a field's flag is its name with dashes, except top_p
SAMPLER_OPTIONS = ("remdm_strategy", "remdm_eta", "remdm_loop", "remdm_t_on", "remdm_t_off",
                   "remdm_alpha_on", "commit_schedule", "commit_per_step", "confidence_noise")
_FLAG_OF = {"top_p": "--sampling-topp"}


def user_error(error: SamplerError) -> MDLMUserError:
    """A sampler's error as the user's: it names the flag of the field it is about."""
    flag = _FLAG_OF.get(error.field, "--" + error.field.replace("_", "-"))
    return MDLMUserError(f"{flag}: {error}")


@dataclass
class GenerationStats:
    """Totals over every ``generate`` call of one generator."""

    samples: int = 0            # hypotheses produced
    filled_tokens: int = 0      # positions the sampler filled (given tokens excluded)
    network_calls: int = 0      # denoiser calls made by the samplers
    row_calls: int = 0          # rows evaluated by those calls (ddpm_cache runs subsets)
    seconds: float = 0.0        # wall time of the sampling
    entropy_sum: float = 0.0    # sum over samples of their unigram entropy (nats)
    repetition_sum: float = 0.0  # sum over samples of their share of repeated 4-grams

    @property
    def tokens_per_second(self) -> float:
        return self.filled_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_unigram_entropy(self) -> float:
        return self.entropy_sum / self.samples if self.samples else 0.0

    @property
    def mean_repeated_4grams(self) -> float:
        return self.repetition_sum / self.samples if self.samples else 0.0

    def summary(self) -> str:
        return (f"mdlm sampling: {self.samples} samples, {self.filled_tokens} tokens "
                f"filled, {self.network_calls} network calls "
                f"({self.row_calls} row evaluations), {self.seconds:.2f} s, "
                f"{self.tokens_per_second:.1f} tokens/s, mean unigram entropy "
                f"{self.mean_unigram_entropy:.3f} nats, repeated 4-grams "
                f"{100 * self.mean_repeated_4grams:.1f}%")


def _log_summary(stats: GenerationStats) -> None:
    """Log the totals (the generator was released, or the process is ending)."""
    if not stats.samples or getattr(sys, "last_value", None) is not None:
        return                         # nothing made, or dying of an uncaught error
    streams = [getattr(h, "stream", None) for h in logging.getLogger().handlers + logger.handlers]
    if any(getattr(s, "closed", False) for s in streams):
        print(f"{logger.name}: {stats.summary()}", file=sys.stderr)   # a closed log file
    else:
        logger.info(stats.summary())


def _plain(value):
    """A config value as a plain Python value (fairseq's ChoiceEnum values are enums)."""
    return str(value) if hasattr(value, "value") and isinstance(value.value, str) else value


@dataclass
class _Row:
    """One hypothesis in the making."""

    source: int                       # index of its input in the batch
    prompt: torch.Tensor              # given tokens (template: with <mask>)
    template: bool
    tokens: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    steps: int = 0
    history: Optional[List[torch.Tensor]] = None


class MaskedDiffusionGenerator:
    """Samples from one MDLM with the samplers of ``diffusion/samplers.py``.

    Use :meth:`from_task` (what the task's ``build_generator`` does), or build one
    directly, e.g. for a benchmark, and call :meth:`generate_from_prompts`.
    """

    def __init__(self, model, schedule, dictionary, mask_index: int, *,
                 sampler: str = "ddpm_cache", steps: int = 128, gen_length: int,
                 window: int, semi_ar_stride: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, nbest: int = 1, seed: int = 1,
                 retain_history: bool = False, stop_at_eos: bool = False,
                 **sampler_options):
        """``sampler_options``: the other fields of :class:`SamplerConfig`
        (``SAMPLER_OPTIONS``: ReMDM's and the confidence sampler's)."""
        self.model = model
        self.schedule = schedule
        self.mask_index = mask_index
        self.pad = dictionary.pad()
        self.eos = dictionary.eos()
        self.symbols_to_strip_from_output = {self.eos}
        if window < 1:
            raise MDLMUserError(f"the sampling window (--tokens-per-sample) must be >= 1, "
                                f"got {window}")
        if gen_length < 1:
            raise MDLMUserError(f"--gen-length must be >= 1 (or 0 for --tokens-per-sample), "
                                f"got {gen_length}")
        if not 0 <= semi_ar_stride <= window:
            raise MDLMUserError(f"--semi-ar-stride must be in [1, window={window}] "
                                f"(--tokens-per-sample), or 0 for automatic; got {semi_ar_stride}")
        if nbest < 1:
            raise MDLMUserError(f"--nbest must be >= 1, got {nbest}")
        self.gen_length, self.window, self.nbest, self.seed = gen_length, window, nbest, seed
        self.block_size = getattr(model, "block_size", None)     # block diffusion: L'
        check_block_options(self.block_size, semi_ar_stride=semi_ar_stride,
                            retain_history=retain_history, stop_at_eos=stop_at_eos)
        self.stop_at_eos = stop_at_eos
        self.semi_ar = not self.block_size and (semi_ar_stride > 0 or gen_length > window)
        self.stride = semi_ar_stride or max(1, window // 2)
        if retain_history and self.semi_ar:
            raise MDLMUserError(
                "--retain-iter-history is not available with semi-autoregressive sampling "
                f"(--gen-length {gen_length} beyond the window of {window} tokens, or "
                f"--semi-ar-stride): sample one window to see the denoising trajectory")
        self.retain_history = retain_history
        try:
            self.config = SamplerConfig(sampler=str(sampler), steps=steps,
                                        temperature=temperature, top_p=top_p,
                                        time_conditioned=bool(model.time_conditioning),
                                        **sampler_options)
        except SamplerError as e:
            raise user_error(e) from None
        self.stats = GenerationStats()
        self._rng: Optional[torch.Generator] = None
        # log the totals once, when the CLI has printed everything: when the generator
        # is released, or at exit (fairseq's checkpoint loading can leave the CLI's
        # frame, and so the generator, in a reference cycle until then)
        weakref.finalize(self, _log_summary, self.stats)
        if self.semi_ar:
            logger.info("semi-autoregressive sampling: %d tokens in windows of %d, "
                        "%d new per window", gen_length, window, self.stride)

    @classmethod
    def from_task(cls, task, models, gen_args):
        """From the task's config (--sampler, --steps, --gen-length, --semi-ar-stride,
        --tokens-per-sample, --seed) and fairseq's generation config (--temperature,
        --sampling-topp (negative: off, fairseq's default), --nbest,
        --retain-iter-history)."""
        model, options = cls.sampling_options(task, models, gen_args)
        args = task.args
        limit = model.max_positions() if hasattr(model, "max_positions") else None
        window = args.tokens_per_sample if not isinstance(limit, int) else min(
            args.tokens_per_sample, limit)
        return cls(model, task.schedule, task.target_dictionary, task.mask_index,
                   gen_length=args.gen_length or args.tokens_per_sample, window=window,
                   semi_ar_stride=args.semi_ar_stride,
                   stop_at_eos=bool(getattr(args, "stop_at_eos", False)), **options)

    @staticmethod
    def sampling_options(task, models, gen_args):
        """(the one model, the constructor's sampling options) from the task's
        :class:`DiffusionOptions` and fairseq's generation config."""
        if len(models) != 1:
            raise MDLMUserError(f"masked diffusion sampling takes one checkpoint, got an "
                                f"ensemble of {len(models)} (--path a:b)")
        model = models[0]
        if not callable(getattr(model, "sampling_denoiser", None)):
            raise MDLMUserError(f"a masked diffusion task samples from an mdlm model; the "
                                f"checkpoint holds a {type(model).__name__}")
        args = task.args
        top_p = getattr(gen_args, "sampling_topp", -1.0)
        return model, dict(
            sampler=args.sampler, steps=args.steps,
            temperature=getattr(gen_args, "temperature", 1.0),
            top_p=1.0 if top_p < 0 else top_p,
            nbest=getattr(gen_args, "nbest", 1), seed=args.seed,
            retain_history=bool(getattr(gen_args, "retain_iter_history", False)),
            **{name: _plain(getattr(args, name)) for name in SAMPLER_OPTIONS
               if hasattr(args, name)})

    # ----------------------------------------------------------------- inputs

    def prompts_of(self, sample, prefix_tokens=None) -> List[torch.Tensor]:
        """The inputs of a fairseq batch: a data split's sample (it has a target)
        gives its ``prefix_tokens`` (``--prefix-size``) or, without, empty prompts;
        an inference sample gives its ``src_tokens``."""
        if sample.get("target") is not None:
            if prefix_tokens is None:
                empty = sample["target"].new_zeros(0)
                return [empty] * sample["target"].size(0)
            return [row[row != self.pad] for row in prefix_tokens]
        return [row[row != self.pad] for row in sample["net_input"]["src_tokens"]]

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens=None, **kwargs):
        """fairseq's generator API: a list (per input) of ``--nbest`` hypotheses."""
        if len(models) != 1 or models[0] is not self.model:
            raise MDLMUserError("the generator samples from the model it was built with")
        return self.generate_from_prompts(self.prompts_of(sample, prefix_tokens))

    def _check(self, prompt: torch.Tensor) -> bool:
        """True for an infilling template; raises for an input that cannot be done."""
        n = prompt.numel()
        if bool((prompt == self.mask_index).any()):
            if n > self.window:
                raise MDLMUserError(
                    f"an infilling template has {n} tokens, more than the window of "
                    f"{self.window} (--tokens-per-sample): a template must fit one window")
            return True
        if n > self.gen_length:
            raise MDLMUserError(
                f"a prompt has {n} tokens, more than the requested length --gen-length "
                f"{self.gen_length} (the length includes the prompt): raise --gen-length "
                f"or shorten the prompt")
        return False

    # ----------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate_from_prompts(self, prompts: Sequence[torch.Tensor]):
        """Hypotheses for each prompt (1-D token tensors: empty = unconditional, with
        ``<mask>`` = infilling template), ``nbest`` independent samples each."""
        device = next(self.model.parameters()).device
        rows = []
        for i, p in enumerate(prompts):
            p = p.to(device=device, dtype=torch.long)
            template = self._check(p)
            rows += [_Row(i, p, template) for _ in range(self.nbest)]
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device)
            self._rng.manual_seed(self.seed)
        self.model.eval()

        start = time.perf_counter()
        calls = [0, 0]
        one_run = [r for r in rows if r.template or not self.semi_ar]
        if self.block_size:
            generate_block_rows(self, rows, calls)
        elif one_run:
            self._sample_one_window(one_run, calls)
        by_length = {}                 # semi-AR continuations, grouped by prompt length
        for r in rows:
            if self.semi_ar and not r.template:
                by_length.setdefault(r.prompt.numel(), []).append(r)
        for _, group in sorted(by_length.items()):
            self._sample_semi_ar(group, calls)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        hypos = [[] for _ in prompts]
        filled = 0
        for r in rows:
            given = r.prompt != self.mask_index
            if not r.template:
                given = torch.cat([given, given.new_zeros(r.tokens.numel() - r.prompt.numel())])
            n_filled = int((~given).sum())
            filled += n_filled
            scores = r.scores.masked_fill(given, 0.0).float().cpu()
            hypo = {
                "tokens": r.tokens.cpu(),
                "score": float(scores.sum()) / n_filled if n_filled else 0.0,
                "positional_scores": scores,
                "alignment": None,
                "steps": r.steps,
            }
            if r.history is not None:
                hypo["history"] = [{"tokens": h.cpu()} for h in r.history]
            hypos[r.source].append(hypo)
            self.stats.entropy_sum += unigram_entropy(r.tokens.unsqueeze(0))
            self.stats.repetition_sum += repeated_ngram_share(r.tokens.unsqueeze(0))
        self.stats.samples += len(rows)
        self.stats.filled_tokens += filled
        self.stats.network_calls += calls[0]
        self.stats.row_calls += calls[1]
        self.stats.seconds += seconds
        return hypos

    def _denoiser(self):
        """The model's sampling denoiser (its output layer runs where a step draws a
        token) with ``<pad>`` never predicted: the model reads it as padding, so it
        cannot be text."""
        return self.model.sampling_denoiser(exclude=(self.pad,))

    def _sample_one_window(self, rows: List[_Row], calls: List[int]) -> None:
        """One ``sample`` run over the rows (prompt + masks up to --gen-length, or
        the template), right-padded to a common length."""
        inputs = []
        for r in rows:
            if r.template:
                inputs.append(r.prompt)
            else:
                fill = self.gen_length - r.prompt.numel()
                inputs.append(torch.cat([r.prompt, r.prompt.new_full((fill,), self.mask_index)]))
        lengths = [x.numel() for x in inputs]
        z = inputs[0].new_full((len(rows), max(lengths)), self.pad)
        for k, x in enumerate(inputs):
            z[k, :x.numel()] = x
        try:
            out = sample(self._denoiser(), z, self.config, self.schedule, self.mask_index,
                         generator=self._rng, retain_history=self.retain_history)
        except SamplerError as e:
            raise user_error(e) from None
        scores = out.scores
        calls[0] += out.network_calls
        calls[1] += out.row_calls
        history = out.history
        if history is not None and not torch.equal(history[-1], out.tokens):
            history = history + [out.tokens]
        for k, (r, n) in enumerate(zip(rows, lengths)):
            r.tokens, r.scores, r.steps = out.tokens[k, :n], scores[k, :n], out.steps
            if history is not None:
                r.history = [h[k, :n] for h in history]

    def _sample_semi_ar(self, rows: List[_Row], calls: List[int]) -> None:
        """One ``sample_semi_ar`` run over rows whose prompts have the same length."""
        prefix = torch.stack([r.prompt for r in rows])
        try:
            out = sample_semi_ar(self._denoiser(), prefix, self.gen_length, self.window,
                                 self.stride, self.config, self.schedule, self.mask_index,
                                 generator=self._rng)
        except SamplerError as e:
            raise user_error(e) from None
        scores = out.scores
        calls[0] += out.network_calls
        calls[1] += out.row_calls
        for k, r in enumerate(rows):
            r.tokens, r.scores, r.steps = out.tokens[k], scores[k], out.steps


class TranslationGenerator(MaskedDiffusionGenerator):
    """Translation with a ``mdlm_translation`` model: each source becomes the template
    ``[<mask> x canvas ; source]`` (``diffusion/conditional.py``), sampled by the same
    loop as any infilling template (the source is given, so it never changes); the
    hypothesis is the canvas up to its first ``</s>``, as a translation model's.

    ``tokens`` / ``positional_scores``: the target text with its ``</s>`` (a canvas
    without one is kept whole); ``score``: the mean of ``positional_scores``."""

    def __init__(self, model, schedule, dictionary, mask_index, **options):
        positions = model.cfg.max_positions
        super().__init__(model, schedule, dictionary, mask_index, gen_length=positions,
                         window=positions, **options)
        self.canvas = model.canvas

    @classmethod
    def from_task(cls, task, models, gen_args):
        model, options = cls.sampling_options(task, models, gen_args)
        if not hasattr(model, "canvas"):
            raise MDLMUserError(f"--task translation_masked_diffusion samples from an "
                                f"mdlm_translation model; the checkpoint holds a "
                                f"{type(model).__name__}")
        return cls(model, task.schedule, task.target_dictionary, task.mask_index, **options)

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens=None, **kwargs):
        if len(models) != 1 or models[0] is not self.model:
            raise MDLMUserError("the generator samples from the model it was built with")
        if prefix_tokens is not None:
            raise MDLMUserError("--prefix-size is not supported by translation sampling")
        sources = strip_padding(sample["net_input"]["src_tokens"], self.pad)
        return self.translate(sources)

    def translate(self, sources: Sequence[torch.Tensor]):
        """``nbest`` hypotheses for each source (1-D token tensors, ``</s>`` included)."""
        for s in sources:
            if s.numel() + self.canvas > self.window or bool((s == self.mask_index).any()):
                raise MDLMUserError(
                    f"a source of {s.numel()} tokens does not fit the model: its "
                    f"{self.window} positions hold sources of at most "
                    f"{self.window - self.canvas} tokens (with </s>) beside the "
                    f"{self.canvas}-token target canvas"
                    if s.numel() + self.canvas > self.window else
                    "a source contains <mask>, which translation does not fill")
        templates = [torch.cat([s.new_full((self.canvas,), self.mask_index), s]) for s in sources]
        hypos = self.generate_from_prompts(templates)
        for hs in hypos:
            for h in hs:
                n = read_canvas(h["tokens"], self.canvas, self.eos)
                h["tokens"] = h["tokens"][:n]
                h["positional_scores"] = h["positional_scores"][:n]
                h["score"] = float(h["positional_scores"].mean())
                if "history" in h:
                    h["history"] = [{"tokens": x["tokens"][:self.canvas]} for x in h["history"]]
        return hypos
