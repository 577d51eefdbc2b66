"""fairseq language model ``mdlm_ar``: the autoregressive twin of ``mdlm``.

The same DiT backbone (backbone.py) with causal attention, trained on next-token
prediction by fairseq's own ``--task language_modeling --criterion cross_entropy``,
scored by ``fairseq-eval-lm`` and sampled by ``fairseq-generate`` /
``fairseq-interactive`` (``--sampling``) through a key/value cache. Comparing it with
``mdlm`` changes the objective (and the attention mask) and nothing else: blocks,
width, rotary embeddings, untied embeddings, initialisation and every flag.

adaLN: kept, with a learned constant conditioning vector, exactly as MDLM runs
without time conditioning (the paper's default). The reference AR baseline drops
adaLN instead; with a constant input adaLN is only a per-channel affine after each
LayerNorm and a per-channel gate on each residual branch, so the function class is
the same, while keeping it gives the AR model the very parameters, parameter count
and zero-initialised (identity) start of the MDLM it is compared with, and no second
block class.

Architectures ``mdlm_ar_tiny`` / ``mdlm_ar_small`` / ``mdlm_ar_medium`` apply the
``mdlm_*`` architecture functions; the flags are MDLM's backbone flags
(``--time-conditioning`` excepted).

Padding: the language_modeling task pads on the right only, and under causal
attention a padded position is never a key of an earlier one, so no padding mask is
needed (the fast ``is_causal`` attention path is kept).
"""

from dataclasses import dataclass, field, fields

from fairseq.dataclass import FairseqDataclass
from fairseq.models import (FairseqIncrementalDecoder, FairseqLanguageModel, register_model,
                            register_model_architecture)

from ..errors import MDLMUserError
from .backbone import DiT, KVCache
from .mdlm import (MDLMConfig, check_same_dictionary, dictionary_fingerprint, mdlm_base,
                   mdlm_medium, mdlm_small, mdlm_tiny)

_MDLM_FIELDS = {f.name: f for f in fields(MDLMConfig)}


def _as_in_mdlm(name: str):
    """MDLM's flag ``name`` with its default and help: one source for both models' sizes."""
    f = _MDLM_FIELDS[name]
    return field(default=f.default, metadata=f.metadata)


@dataclass
class MDLMARConfig(FairseqDataclass):
    """MDLM's backbone flags (``--time-conditioning`` excepted: the AR twin has no time)."""
    embed_dim: int = _as_in_mdlm("embed_dim")
    layers: int = _as_in_mdlm("layers")
    attention_heads: int = _as_in_mdlm("attention_heads")
    cond_dim: int = _as_in_mdlm("cond_dim")
    dropout: float = _as_in_mdlm("dropout")
    max_positions: int = _as_in_mdlm("max_positions")
    compile_blocks: bool = _as_in_mdlm("compile_blocks")


class MDLMARDecoder(FairseqIncrementalDecoder):
    """Causal DiT over the language_modeling dictionary: (B, L) shifted tokens ->
    (B, L, V) next-token logits. With fairseq's ``incremental_state`` the keys and
    values of the tokens already seen are cached, and only the new ones are run."""

    def __init__(self, cfg, dictionary):
        super().__init__(dictionary)
        self.backbone = DiT(
            vocab_size=len(dictionary), dim=cfg.embed_dim, layers=cfg.layers,
            heads=cfg.attention_heads, cond_dim=cfg.cond_dim, dropout=cfg.dropout,
            max_positions=cfg.max_positions, causal=True, time_conditioning=False)
        if getattr(cfg, "compile_blocks", False):
            self.backbone.compile_blocks()

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                features_only=False, **kwargs):
        x, extra = self.extract_features(prev_output_tokens, incremental_state=incremental_state)
        return (x if features_only else self.output_layer(x)), extra

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         **kwargs):
        tokens, cache = prev_output_tokens, None
        if incremental_state is not None:
            # fairseq passes the whole prefix at every step: run what is not cached yet
            cache = KVCache(self.get_incremental_state(incremental_state, "kv"))
            tokens = prev_output_tokens[:, cache.length:]
            if tokens.size(1) == 0:
                raise ValueError(f"incremental decoding got {prev_output_tokens.size(1)} "
                                 f"tokens, all of them already cached")
        total = prev_output_tokens.size(1)
        if total > self.max_positions():
            raise MDLMUserError(
                f"a sequence of {total} tokens exceeds the model's {self.max_positions()} "
                f"positions: pass --tokens-per-sample {self.max_positions()} or less")
        x, _ = self.backbone.hidden(tokens, cache=cache)
        if cache is not None:
            self.set_incremental_state(incremental_state, "kv", cache.store)
        return x, {"attn": None}

    def output_layer(self, features, **kwargs):
        c = self.backbone.condition(features.size(0), device=features.device)
        return self.backbone.final(features, c)

    def reorder_incremental_state(self, incremental_state, new_order):
        store = self.get_incremental_state(incremental_state, "kv")
        if store is not None:
            KVCache(store).reorder(new_order)
            self.set_incremental_state(incremental_state, "kv", store)

    def max_positions(self):
        return self.backbone.max_positions


@register_model("mdlm_ar", dataclass=MDLMARConfig)
class MDLMARModel(FairseqLanguageModel):
    """Left-to-right language model on the MDLM backbone (see the module docstring)."""

    def __init__(self, decoder, dictionary):
        super().__init__(decoder)
        # as in MDLMModel: the dictionary's fingerprint travels in every checkpoint
        # (named *version* so that fairseq's EMA leaves it alone)
        self.register_buffer("dictionary_version", dictionary_fingerprint(dictionary))

    @classmethod
    def build_model(cls, cfg, task):
        source, target = task.source_dictionary, task.target_dictionary
        if source is None or getattr(task, "mask_index", None) is not None:
            raise MDLMUserError("the mdlm_ar model needs --task language_modeling "
                                "(with --criterion cross_entropy)")
        if len(target) != len(source):
            raise MDLMUserError("--output-dictionary-size is not supported by mdlm_ar: its "
                                "input and output vocabularies are the same dictionary")
        tokens_per_sample = getattr(task.args, "tokens_per_sample", 0)
        if tokens_per_sample > cfg.max_positions:
            # fairseq reads it from the command line, not from the checkpoint
            raise MDLMUserError(
                f"--tokens-per-sample {tokens_per_sample} exceeds the model's "
                f"{cfg.max_positions} positions: lower --tokens-per-sample (or, when "
                f"training, raise --max-positions)")
        return cls(MDLMARDecoder(cfg, target), target)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_same_dictionary(state_dict, self.dictionary_version, len(self.decoder.dictionary))
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg,
                                       args=args)


# the sizes are MDLM's: each architecture applies its mdlm twin's defaults
@register_model_architecture("mdlm_ar", "mdlm_ar_base")
def mdlm_ar_base(args):
    mdlm_base(args)


@register_model_architecture("mdlm_ar", "mdlm_ar_tiny")
def mdlm_ar_tiny(args):
    mdlm_tiny(args)


@register_model_architecture("mdlm_ar", "mdlm_ar_small")
def mdlm_ar_small(args):
    mdlm_small(args)


@register_model_architecture("mdlm_ar", "mdlm_ar_medium")
def mdlm_ar_medium(args):
    mdlm_medium(args)
