"""fairseq model ``mdlm``: the DiT backbone (backbone.py) behind fairseq's model API.

Architectures: ``mdlm_tiny`` (CPU-sized), ``mdlm_small`` (the paper's ~110M class),
``mdlm_medium``. The model also records a fingerprint of the dictionary it was
built with (a buffer, so it travels in every checkpoint): loading a checkpoint
against a different dictionary is one clear error instead of a shape mismatch.
"""

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from fairseq.utils import safe_getattr

from ..errors import MDLMUserError
from ..diffusion.blocks import check_block_size
from .backbone import BlockKVCache, DiT


def dictionary_fingerprint(dictionary) -> torch.Tensor:
    """16 bytes of md5 over the symbols, in order (the <mask> symbol included)."""
    digest = hashlib.md5("\n".join(dictionary.symbols).encode("utf-8")).digest()
    return torch.tensor(list(digest), dtype=torch.uint8)


def check_same_dictionary(state_dict, fingerprint: torch.Tensor, n_symbols: int) -> None:
    """One clear error when a checkpoint was trained with another dictionary (before
    fairseq would fail on a shape mismatch, or silently load a same-sized one)."""
    theirs = state_dict.get("dictionary_version")
    if theirs is None or torch.equal(theirs.cpu(), fingerprint.cpu()):
        return
    n_theirs = next(v.shape[0] for k, v in state_dict.items()
                    if k.endswith("backbone.embed.weight"))
    raise MDLMUserError(
        f"the checkpoint was trained with a different dictionary ({n_theirs} symbols) than "
        f"the data directory's dict.txt gives ({n_symbols} symbols): pass the data-bin "
        f"directory the model was trained on")


@dataclass
class MDLMConfig(FairseqDataclass):
    embed_dim: int = field(default=512, metadata={"help": "model width"})
    layers: int = field(default=8, metadata={"help": "number of transformer blocks"})
    attention_heads: int = field(default=8, metadata={"help": "attention heads"})
    cond_dim: int = field(default=128, metadata={"help": "adaLN conditioning width"})
    dropout: float = field(default=0.1, metadata={"help": "residual dropout"})
    max_positions: int = field(
        default=1024, metadata={"help": "longest sequence the model accepts"})
    time_conditioning: bool = field(
        default=False,
        metadata={"help": "feed the noise level sigma(t) to the network (off in the paper; "
                          "without it the cached sampler is exact)"})
    compile_blocks: bool = field(
        default=False,
        metadata={"help": "compile each transformer block with torch.compile (inductor): "
                          "the blocks have no graph break; the first updates pay the "
                          "compilation, and new batch shapes a recompilation"})
    block_attention: str = field(
        default="auto",
        metadata={"help": "block diffusion's training attention: flex (flex_attention with "
                          "a cached block mask), sdpa (a dense mask), or auto: flex on "
                          "CUDA, sdpa elsewhere (flex has no backward on CPU)"})
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "block diffusion (BD3-LM): blocks of L' tokens, each a masked "
                          "diffusion given the clean blocks before it (1 <= L' dividing "
                          "--tokens-per-sample; 1 is autoregressive). Default: the whole "
                          "window, i.e. MDLM. Saved in the checkpoint: sampling reads it"})


@register_model("mdlm", dataclass=MDLMConfig)
class MDLMModel(BaseFairseqModel):
    """Bidirectional denoiser x_theta(z_t) over the task's dictionary (with <mask>)."""

    def __init__(self, cfg: MDLMConfig, dictionary):
        super().__init__()
        self.cfg = cfg
        self.pad_index = dictionary.pad()
        self.backbone = DiT(
            vocab_size=len(dictionary), dim=cfg.embed_dim, layers=cfg.layers,
            heads=cfg.attention_heads, cond_dim=cfg.cond_dim, dropout=cfg.dropout,
            max_positions=cfg.max_positions, causal=False,
            time_conditioning=cfg.time_conditioning,
            block_attention=safe_getattr(cfg, "block_attention", "auto"))
        if safe_getattr(cfg, "compile_blocks", False):
            self.backbone.compile_blocks()
        # a uint8 buffer, so it travels in every checkpoint; fairseq's EMA averages every
        # state-dict entry except keys containing "version", hence the name
        self.register_buffer("dictionary_version", dictionary_fingerprint(dictionary))

    @classmethod
    def build_model(cls, cfg, task):
        if getattr(task, "mask_index", None) is None:
            raise MDLMUserError("the mdlm model needs --task masked_diffusion "
                                "(it adds the <mask> symbol)")
        block_size = safe_getattr(cfg, "block_size", None)
        if block_size is not None:
            try:
                check_block_size(block_size, task.args.tokens_per_sample)
            except ValueError as e:
                raise MDLMUserError(f"--block-size: {e} (--tokens-per-sample); pick a "
                                    f"divisor of it, or leave --block-size out for "
                                    f"MDLM") from None
        return cls(cfg, task.source_dictionary)

    @property
    def block_size(self) -> Optional[int]:
        """L' of a block-diffusion model, None for MDLM."""
        return safe_getattr(self.cfg, "block_size", None)

    @property
    def time_conditioning(self) -> bool:
        return bool(self.cfg.time_conditioning)

    def max_positions(self):
        return self.cfg.max_positions

    def forward(self, src_tokens, sigma=None, positions=None, padded: Optional[bool] = None):
        """Logits (B, L, V), or (N, V) for the ``positions`` selected; padding is
        read off ``src_tokens`` and never attended to (``padded``: see
        ``padding_mask``)."""
        return self.backbone(src_tokens, sigma=sigma,
                             padding_mask=self.padding_mask(src_tokens, padded),
                             positions=positions)

    def padding_mask(self, tokens, padded: Optional[bool] = None):
        """The backbone's ``padding_mask`` of ``tokens``: ``tokens == <pad>``, or None for
        a batch without padding (attention then runs maskless: flash attention on a
        GPU). ``padded`` says whether the batch holds padding when the caller knows it
        on the host (training: the bound criteria, from the batch's token count);
        None tests the mask here, which on a GPU waits for the device (sampling)."""
        if padded is False:
            return None
        mask = tokens.eq(self.pad_index)
        if padded is None and not bool(mask.any()):
            return None
        return mask

    def denoiser(self, clean=None, padded: Optional[bool] = None):
        """The callable the diffusion core expects: (z_t, sigma, positions) -> logits.
        A block model's (training) denoiser also reads the clean sequence ``clean``
        (B, L): block b of z_t is denoised given the clean blocks before it.
        ``padded``: whether the sequences hold padding, if the caller knows (see
        ``padding_mask``; the noisy ones have the padding of the clean ones)."""
        if self.block_size is None:
            return lambda z_t, sigma, positions: self(z_t, sigma=sigma, positions=positions,
                                                      padded=padded)
        if clean is None:
            raise ValueError("a block model's denoiser needs the clean sequence (clean=)")
        padding_mask = self.padding_mask(clean, padded)
        return lambda z_t, sigma, positions: self.backbone.forward_blocks(
            z_t, clean, self.block_size, sigma=sigma, padding_mask=padding_mask,
            positions=positions)

    def sampling_denoiser(self, exclude=()):
        """Sampling's denoiser (``diffusion.samplers.sample``) of an MDLM: (z_t, sigma,
        positions) -> :class:`~.backbone.OutputRows`, the last hidden states at the
        positions asked for, so the output layer runs only where a step draws a token;
        each position's logits are those of ``denoiser()`` (bitwise on one thread),
        with the symbols ``exclude`` never predicted. Block models sample through
        ``block_context``; training uses ``denoiser``."""
        if self.block_size is not None:
            raise ValueError("a block model samples through block_context()")

        def denoise(z_t, sigma, positions):
            h, c = self.backbone.hidden(z_t, sigma=sigma, padding_mask=self.padding_mask(z_t))
            return self.backbone.output_rows(h, c, positions, exclude)
        return denoise

    def block_context(self, window: int, exclude=()) -> "CachedBlocks":
        """Block sampling's view of this model (``diffusion.blocks.sample_blocks``):
        committed blocks in a key/value cache of the last window - L' positions;
        the symbols ``exclude`` are never predicted."""
        return CachedBlocks(self.backbone, window - self.block_size, exclude)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_same_dictionary(state_dict, self.dictionary_version,
                              self.backbone.embed.num_embeddings)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg,
                                       args=args)


class CachedBlocks:
    """``diffusion.blocks.BlockContext`` over a DiT and a :class:`BlockKVCache`:
    each committed block is run through the network once (``commits`` counts them),
    with the next block's first step where the cache fuses them. ``denoise`` returns
    ``OutputRows``: the output layer runs where the sampler draws; ``exclude``: symbols
    never predicted."""

    def __init__(self, backbone: DiT, context: int, exclude=(), fuse: bool = True):
        self.backbone, self.exclude = backbone, exclude
        self.cache, self.commits = BlockKVCache(context, fuse), 0

    def denoise(self, rows, z, sigma, positions):
        h, c = self.backbone.block_hidden(z, self.cache, sigma=sigma, rows=rows)
        return self.backbone.output_rows(h, c, positions, self.exclude)

    def commit(self, tokens):
        self.backbone.block_step(tokens, self.cache, commit=True)
        self.commits += 1

    def keep(self, index):
        self.cache.reorder(index)


def _defaults(args, **values):
    for name, value in values.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("mdlm", "mdlm_base")
def mdlm_base(args):
    _defaults(args, embed_dim=512, layers=8, attention_heads=8, cond_dim=128, dropout=0.1,
              max_positions=1024, time_conditioning=False)


@register_model_architecture("mdlm", "mdlm_tiny")
def mdlm_tiny(args):
    """CPU-sized: 4 x 256, 4 heads (~8M parameters with a 10k vocabulary)."""
    _defaults(args, embed_dim=256, layers=4, attention_heads=4, cond_dim=128, max_positions=512)
    mdlm_base(args)


@register_model_architecture("mdlm", "mdlm_small")
def mdlm_small(args):
    """The paper's ~110M class: 12 x 768, 12 heads."""
    _defaults(args, embed_dim=768, layers=12, attention_heads=12, cond_dim=128)
    mdlm_base(args)


@register_model_architecture("mdlm", "mdlm_medium")
def mdlm_medium(args):
    """24 x 1024, 16 heads."""
    _defaults(args, embed_dim=1024, layers=24, attention_heads=16, cond_dim=128)
    mdlm_base(args)
