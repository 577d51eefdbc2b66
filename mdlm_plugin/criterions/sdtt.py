"""fairseq criterion ``sdtt``: one round of self-distillation through time.

The math is ``diffusion.sdtt`` (module docstring there); this file loads the teacher
and adapts fairseq's sample and model to it. The student is the model being trained
(initialise it from the teacher with ``--finetune-from-model TEACHER.pt``); the teacher
(``--teacher-path``) is loaded once, on the first training step, frozen and in eval
mode, and kept outside the criterion's modules, so it is neither optimised nor saved
in the student's checkpoints.

Training logs ``loss``: the divergence in nats per masked position. Evaluation (the
validation of a training run, and fairseq-validate, which builds the criterion saved
in the checkpoint) is the ``mdlm`` criterion's bound, so a student validates like any
MDLM checkpoint and fairseq-validate never reads the teacher; a training run's
validation also logs ``sdtt_div``, the divergence on the validation split.
"""

from dataclasses import dataclass, field

import torch
from fairseq import checkpoint_utils, metrics
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.models import ARCH_MODEL_REGISTRY

from ..diffusion import sdtt
from ..diffusion.samplers import SamplerError
from ..errors import MDLMUserError
from ..models.mdlm import MDLMModel
from .bound import BoundCriterionConfig
from .mdlm import MDLMCriterion

# what must agree between teacher and student (the student starts as a copy of it)
ARCH_FIELDS = ("embed_dim", "layers", "attention_heads", "cond_dim", "time_conditioning",
               "block_size", "max_positions")


@dataclass
class SDTTCriterionConfig(BoundCriterionConfig):
    teacher_path: str = field(
        default="", metadata={"help": "the teacher's checkpoint (an mdlm model trained on "
                                      "data, or the student of the previous round)"})
    sdtt_steps: int = field(
        default=0, metadata={"help": "T: the student's sampling steps in this round; the "
                                     "teacher takes 2T. A teacher distilled for T' steps "
                                     "needs T = T'/2"})
    sdtt_divergence: ChoiceEnum(list(sdtt.DIVERGENCES)) = field(
        default="reverse_kl", metadata={"help": "student vs the two-step teacher: "
                                                "reverse_kl (SDTT's best), kl, mse (of "
                                                "log-probabilities)"})
    sdtt_sampler: ChoiceEnum(list(sdtt.TEACHER_SAMPLERS)) = field(
        default="ddpm", metadata={"help": "the teacher's step rule (and the sampler the "
                                          "student is meant for); ddpm_cache needs a model "
                                          "without time conditioning"})


def _criterion_steps(cfg) -> "int | None":
    """The step count a checkpoint's model was distilled for (None: trained on data)."""
    criterion = (cfg or {}).get("criterion") or {}
    if criterion.get("_name") == "sdtt":
        return int(criterion.get("sdtt_steps"))
    return None


@register_criterion("sdtt", dataclass=SDTTCriterionConfig)
class SDTTCriterion(MDLMCriterion):
    name = "sdtt"

    def __init__(self, task, teacher_path="", sdtt_steps=0, sdtt_divergence="reverse_kl",
                 sdtt_sampler="ddpm", time_sampling="antithetic", sampling_eps=1e-3):
        super().__init__(task, 0, time_sampling, sampling_eps)
        self.teacher_path, self.steps = teacher_path, sdtt_steps
        self.divergence, self.sampler = str(sdtt_divergence), str(sdtt_sampler)
        self._teacher = []          # a list: not a submodule (not optimised, not saved)

    # ------------------------------------------------------------------ the teacher

    def load_teacher(self, student):
        """The frozen teacher, checked against the student and the flags (one
        :class:`MDLMUserError` per problem); loaded once."""
        if self._teacher:
            return self._teacher[0]
        if not self.teacher_path:
            raise MDLMUserError("--criterion sdtt needs --teacher-path TEACHER.pt (the "
                                "checkpoint to distil)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise MDLMUserError(f"--sdtt-steps must be the student's step count T >= 1 "
                                f"(the teacher takes 2T), got {self.steps!r}")
        if getattr(student, "block_size", None) is not None:
            raise MDLMUserError("--criterion sdtt distils MDLM models; block diffusion "
                                "(--block-size) is not supported yet (docs/sdtt.md)")
        try:
            state = checkpoint_utils.load_checkpoint_to_cpu(self.teacher_path)
        except (OSError, RuntimeError) as e:
            raise MDLMUserError(f"--teacher-path {self.teacher_path}: cannot read the "
                                f"checkpoint ({e})") from None
        cfg = state["cfg"]
        arch = cfg["model"].get("_name")
        if not isinstance(student, MDLMModel) or \
                not issubclass(ARCH_MODEL_REGISTRY.get(arch, object), MDLMModel):
            raise MDLMUserError(f"the teacher {self.teacher_path} is a {arch!r} model and the "
                                f"student a {type(student).__name__}; SDTT distils an 'mdlm' "
                                f"model into a student of the same architecture")
        theirs = {f: cfg["model"].get(f) for f in ARCH_FIELDS}
        ours = {f: getattr(student.cfg, f, None) for f in ARCH_FIELDS}
        differ = [f"{f} {theirs[f]} (teacher) vs {ours[f]} (student)"
                  for f in ARCH_FIELDS if theirs[f] != ours[f]]
        if differ:
            raise MDLMUserError(
                f"the teacher {self.teacher_path} has another architecture than the "
                f"student: {'; '.join(differ)}. Build the student with the teacher's "
                f"--arch and sizes and start it from the teacher (--finetune-from-model)")
        try:
            sdtt.check_steps_reachable(self.steps, _criterion_steps(cfg))
        except ValueError as e:
            raise MDLMUserError(f"--sdtt-steps: {e}") from None
        try:
            sdtt.SamplerConfig(sampler=self.sampler, steps=1,
                               time_conditioned=bool(theirs["time_conditioning"]))
        except SamplerError as e:
            raise MDLMUserError(f"--sdtt-sampler: {e}") from None
        teacher = self.task.build_model(cfg["model"])
        teacher.load_state_dict(state["model"], strict=True)   # checks the dictionary
        param = next(student.parameters())
        teacher.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
        self._teacher.append(teacher)
        return teacher

    # ------------------------------------------------------------------ the loss

    def sdtt_draw(self, model, sample, generator):
        x = sample["target"]
        teacher = self.load_teacher(model)
        return sdtt.sdtt_loss(
            model.denoiser(clean=x), teacher.denoiser(clean=x), x, self.task.schedule,
            self.task.mask_index, self.steps, pad_mask=x.eq(self.padding_idx),
            divergence_kind=self.divergence, sampler=self.sampler,
            time_conditioned=model.time_conditioning, generator=generator)

    def forward(self, model, sample, reduce=True):
        if not model.training:
            loss, sample_size, log = super().forward(model, sample, reduce)
            if self._teacher:       # a training run's validation: the divergence too
                with torch.no_grad():
                    terms = self.sdtt_draw(model, sample,
                                           self._eval_generator(sample, sample["target"].device))
                log["sdtt_div"] = terms.per_position.sum().item()
                log["sdtt_n"] = terms.n_masked
            return loss, sample_size, log
        x = sample["target"]
        terms = self.sdtt_draw(model, sample, self._train_generator(sample, x.device))
        loss = terms.per_position.sum()
        return loss, terms.n_masked, {
            "loss": loss.detach().item(), "sdtt_n": terms.n_masked,
            "ntokens": int(x.ne(self.padding_idx).sum()), "nsentences": x.size(0),
            "sample_size": terms.n_masked}

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        evaluating = bool(logging_outputs) and "_pass0" in logging_outputs[0]
        n = max(total("sdtt_n"), 1)
        if evaluating:
            MDLMCriterion.reduce_metrics(logging_outputs)
            if "sdtt_div" in logging_outputs[0]:
                metrics.log_scalar("sdtt_div", total("sdtt_div") / n, n, round=4)
        else:
            metrics.log_scalar("loss", total("loss") / n, n, round=4)
            metrics.log_scalar("mask_frac", total("sdtt_n") / max(total("ntokens"), 1),
                               total("ntokens"), round=3)
