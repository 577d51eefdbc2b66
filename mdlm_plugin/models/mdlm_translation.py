"""fairseq model ``mdlm_translation``: the MDLM denoiser as a bidirectional prefix
model over ``[target canvas ; source]`` (see ``diffusion/conditional.py``).

The same DiT as the LM (one embedding table, so the data must have a joined
dictionary); the source is read in full by every position and never masked; the
target lives in a canvas of ``--target-canvas`` positions, filled after its
``</s>`` with ``</s>``, so the model learns the target's length. The canvas is a
model setting (it travels in the checkpoint): sampling uses the one trained with.

Architectures: ``mdlm_translation_tiny`` (CPU-sized), ``mdlm_translation_base``.
"""

from dataclasses import dataclass, field

from fairseq.models import register_model, register_model_architecture
from fairseq.utils import safe_getattr

from ..errors import MDLMUserError
from .mdlm import MDLMConfig, MDLMModel, _defaults, mdlm_base


@dataclass
class MDLMTranslationConfig(MDLMConfig):
    target_canvas: int = field(
        default=64, metadata={"help": "target positions the model fills (the target, its "
                                      "</s>, then </s> up to the canvas); longer targets "
                                      "are skipped in training. Source + canvas must fit "
                                      "--max-positions"})


@register_model("mdlm_translation", dataclass=MDLMTranslationConfig)
class MDLMTranslationModel(MDLMModel):
    """x_theta([z_t canvas ; source]) over the joined dictionary (with <mask>)."""

    @classmethod
    def build_model(cls, cfg, task):
        if getattr(task, "mask_index", None) is None or not hasattr(task, "bound_input"):
            raise MDLMUserError("the mdlm_translation model needs --task "
                                "translation_masked_diffusion")
        if safe_getattr(cfg, "block_size", None) is not None:
            raise MDLMUserError("--block-size is not supported by mdlm_translation")
        if not 1 <= cfg.target_canvas < cfg.max_positions:
            raise MDLMUserError(f"--target-canvas must be in [1, --max-positions = "
                                f"{cfg.max_positions}), got {cfg.target_canvas}")
        return cls(cfg, task.source_dictionary)

    @property
    def canvas(self) -> int:
        return self.cfg.target_canvas

    def max_positions(self):
        """(source, target) lengths that fit: the source gets what the canvas leaves."""
        return self.cfg.max_positions - self.canvas, self.canvas


@register_model_architecture("mdlm_translation", "mdlm_translation_base")
def mdlm_translation_base(args):
    _defaults(args, target_canvas=64)
    mdlm_base(args)


@register_model_architecture("mdlm_translation", "mdlm_translation_tiny")
def mdlm_translation_tiny(args):
    """CPU-sized: 4 x 256, 4 heads, 320 positions (source + a 128-token canvas: every
    valid and test verse of examples/bible fits; training skips the few longer)."""
    _defaults(args, embed_dim=256, layers=4, attention_heads=4, cond_dim=128,
              max_positions=320, target_canvas=128)
    mdlm_translation_base(args)
