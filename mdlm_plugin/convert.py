"""Convert the authors' released MDLM / BD3-LM checkpoints into fairseq checkpoints of
our ``mdlm`` model, and back.

    python -m mdlm_plugin.convert REF OUT_DIR            # reference -> fairseq
    python -m mdlm_plugin.convert --reverse CKPT OUT_DIR # fairseq -> reference (HF layout)

REF is either
* a Lightning ``.ckpt`` of kuleshov-group/mdlm or kuleshov-group/bd3lms: a dict whose
  ``state_dict`` holds ``backbone.<name>`` tensors, ``hyper_parameters['config']`` the
  hydra config and, when training kept one, ``ema['shadow_params']``: the EMA weights
  in the order of ``backbone.parameters()`` (used by default, as the reference's own
  evaluation does; ``--no-ema`` takes the raw weights); or
* a Hugging Face hub directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), e.g. a download of ``kuleshov-group/mdlm-owt`` or
  ``kuleshov-group/bd3lm-owt-block_size4``.

The two networks are the same function (backbone.py): the parameters map one to one.
The architecture comes from the shapes (vocabulary, width, depth, conditioning width)
and the config (attention heads, which shapes cannot tell; ``--heads`` overrides;
time conditioning; BD3-LM's block size; the window).

Vocabulary. The reference's ids are GPT-2's (50257 of them) plus its mask (the last
id, 50257); fairseq's ``--bpe gpt2`` writes GPT-2 ids as the symbols ``"0"`` ..
``"50256"``. OUT_DIR/dict.txt lists reference id k as the symbol ``k`` for every id
except two: ``<|endoftext|>`` (``--eos-id``, default the second-to-last id: 50256)
becomes fairseq's ``</s>``, which fairseq-preprocess writes at the end of every line,
as the reference puts ``<|endoftext|>`` between documents; the mask (``--mask-id``,
default the last id) becomes ``<mask>``, which the task appends after dict.txt's
symbols. The embedding and output rows are permuted into that order. fairseq's own
``<s>``, ``<pad>`` and ``<unk>`` have no reference row: their embeddings are zero and
their logits -inf (``DiT.logit_mask``), so they are never sampled (``<pad>`` is also
never attended to; ``<s>`` cannot occur, the task refuses ``--add-bos-token``;
``<unk>`` does not occur in text encoded with GPT-2 BPE, since every id has a
symbol). dict.txt has no ``madeupword`` padding: fairseq-preprocess ``--srcdict``
copies a dictionary as given, and fairseq pads only dictionaries it builds itself.

Reading a Lightning checkpoint unpickles it (it holds the hydra config and the
tokenizer object, so ``weights_only`` loading cannot read it): convert only files you
trust. Classes whose module is not installed (transformers' tokenizer) load as inert
placeholders. The output loads with ``torch.load(..., weights_only=True)``.
"""
import argparse
import enum
import json
import os
import pickle
import re
import struct
import sys
from typing import Dict, Optional

import torch

from .errors import MDLMUserError

FREQ_DIM = 256          # the sinusoidal width of the sigma embedding (both codes)

# reference backbone names and ours (inside ``backbone.``), both directions; {i} is a
# block, {j} a layer of a Sequential, {w} weight or bias
_NAMES = [
    ("vocab_embed.embedding", "embed.weight"),
    ("sigma_map.mlp.{j}.{w}", "sigma_map.mlp.{j}.{w}"),
    ("blocks.{i}.norm1.weight", "blocks.{i}.norm1.weight"),
    ("blocks.{i}.attn_qkv.weight", "blocks.{i}.qkv.weight"),
    ("blocks.{i}.attn_out.weight", "blocks.{i}.attn_out.weight"),
    ("blocks.{i}.norm2.weight", "blocks.{i}.norm2.weight"),
    ("blocks.{i}.mlp.{j}.{w}", "blocks.{i}.mlp.{j}.{w}"),
    ("blocks.{i}.adaLN_modulation.{w}", "blocks.{i}.adaLN.{w}"),
    ("output_layer.norm_final.weight", "final.norm.weight"),
    ("output_layer.linear.{w}", "final.head.{w}"),
    ("output_layer.adaLN_modulation.{w}", "final.adaLN.{w}"),
]
_FIELDS = {"i": r"\d+", "j": "0|2", "w": "weight|bias"}
# the rows indexed by vocabulary id (permuted between the two orders)
_VOCAB_ROWS = ("embed.weight", "final.head.weight", "final.head.bias")


def _template_regex(template: str):
    pattern = re.escape(template)
    for field, alternatives in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{alternatives})")
    return re.compile(pattern)


_TO_OURS = [(_template_regex(r), o) for r, o in _NAMES]
_TO_REFERENCE = [(_template_regex(o), r) for r, o in _NAMES]


def _translate(name: str, table) -> Optional[str]:
    """The other side's name of ``name`` (None when no DiT tensor has it)."""
    for regex, template in table:
        m = regex.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


# the reference's buffers: not parameters (absent from the EMA), recomputed by us
_REFERENCE_BUFFERS = re.compile(r"rotary_emb\.inv_freq")
# uniform-state (non-absorbing) diffusion: DUO, UDLM
_UNIFORM = {"duo", "duo_base", "udlm", "uniform", "distillation", "hyperbolic_duo"}


# --------------------------------------------------------------------- reading


class _Opaque:
    """What an unpickled object of a class that is not installed becomes."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Opaque


_lenient_pickle = type(sys)("mdlm_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = pickle.load
_lenient_pickle.__name__ = "mdlm_lenient_pickle"


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """A ``.safetensors`` file (8-byte little-endian header size, JSON header, raw
    little-endian data) read without the safetensors package."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
              "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        data = f.read()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as e:
        raise MDLMUserError(f"{path} is not a readable safetensors file ({e})") from None
    base, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise MDLMUserError(f"{path}: tensor {key} has dtype {info['dtype']}, which "
                                f"a DiT checkpoint does not use")
        a, b = info["data_offsets"]
        buf = bytearray(data[base + a:base + b])
        t = torch.frombuffer(buf, dtype=dtypes[info["dtype"]]) if buf else \
            torch.empty(0, dtype=dtypes[info["dtype"]])
        out[key] = t.reshape(info["shape"]).clone()
    return out


def _cfg_get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[part] if part in node else None
        except TypeError:
            return default
    return default if node is None else node


class Reference:
    """A reference checkpoint read into plain parts: ``params`` (reference backbone
    name -> tensor, without the ``backbone.`` prefix) and what the config says."""

    def __init__(self, params, heads=None, time_conditioning=False, block_size=None,
                 length=None, dropout=0.1, source="", weights="raw"):
        self.params, self.heads = params, heads
        self.time_conditioning, self.block_size = bool(time_conditioning), block_size
        self.length, self.dropout, self.source, self.weights = length, dropout, source, weights


def _check_absorbing(kind: Optional[str], what: str) -> None:
    if kind is not None and str(kind).lower() in _UNIFORM:
        raise MDLMUserError(
            f"{what} says this is a uniform-state diffusion model ({kind}): its tokens are "
            f"noised towards random tokens, not towards a mask, so it is not an MDLM "
            f"(absorbing-state) model and our sampler and bound do not apply to it")


def load_lightning(path: str):
    """The unpickled Lightning checkpoint (classes not installed become placeholders)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_lenient_pickle)
    except Exception as e:          # noqa: BLE001  (any unreadable file: one error)
        raise MDLMUserError(f"cannot read {path} as a PyTorch checkpoint ({e})") from None


def _read_lightning(path: str, use_ema: bool) -> Reference:
    ckpt = load_lightning(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise MDLMUserError(
            f"{path} is not a checkpoint layout the converter knows: expected a Lightning "
            f".ckpt (a dict with 'state_dict' of 'backbone.*' tensors) or a Hugging Face "
            f"directory (config.json + model.safetensors / pytorch_model.bin)")
    cfg = (ckpt.get("hyper_parameters") or {}).get("config")
    _check_absorbing(_cfg_get(cfg, "algo.name"), f"{path}'s config (algo.name)")
    diffusion = _cfg_get(cfg, "diffusion")
    if diffusion is not None and diffusion != "absorbing_state":
        _check_absorbing("uniform" if "uniform" in str(diffusion) else None,
                         f"{path}'s config (diffusion)")
    param = _cfg_get(cfg, "algo.parameterization", _cfg_get(cfg, "parameterization"))
    if param is not None and param != "subs":
        if param == "mean":
            _check_absorbing("duo", f"{path}'s config (parameterization: mean)")
        raise MDLMUserError(f"{path}: parameterization {param!r}; only MDLM's SUBS "
                            f"parameterization (absorbing state) converts")
    params = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items()
              if k.startswith("backbone.")}
    if not params:
        raise MDLMUserError(f"{path} has a 'state_dict' but no 'backbone.*' tensors: not "
                            f"an MDLM / BD3-LM checkpoint")
    weights = "raw"
    shadow = (ckpt.get("ema") or {}).get("shadow_params") if use_ema else None
    if shadow:
        names = [k for k in params if not _REFERENCE_BUFFERS.fullmatch(k)]
        if len(shadow) != len(names):
            raise MDLMUserError(
                f"{path}: the EMA holds {len(shadow)} tensors but the backbone has "
                f"{len(names)} parameters; pass --no-ema to convert the raw weights")
        for name, s in zip(names, shadow):
            if tuple(s.shape) != tuple(params[name].shape):
                raise MDLMUserError(f"{path}: EMA tensor for {name} has shape "
                                    f"{tuple(s.shape)}, the weight {tuple(params[name].shape)}"
                                    f"; pass --no-ema to convert the raw weights")
            params[name] = s
        weights = "ema"
    block = _cfg_get(cfg, "block_size") if _cfg_get(cfg, "algo.name") == "bd3lm" else None
    if _cfg_get(cfg, "algo.name") == "bd3lm":
        if not _cfg_get(cfg, "algo.cross_attn", True) or \
                _cfg_get(cfg, "algo.causal_attention", False):
            raise MDLMUserError(f"{path}: a BD3-LM without its [x_t, x_0] cross-attention "
                                f"(or causal) does not convert")
    tc = _cfg_get(cfg, "algo.time_conditioning", _cfg_get(cfg, "time_conditioning", False))
    return Reference(params, heads=_cfg_get(cfg, "model.n_heads"), time_conditioning=tc,
                     block_size=block, length=_cfg_get(cfg, "model.length"),
                     dropout=_cfg_get(cfg, "model.dropout", 0.1), source=path,
                     weights=weights)


def _read_hf(path: str) -> Reference:
    with open(os.path.join(path, "config.json")) as f:
        try:
            cfg = json.load(f)
        except ValueError as e:
            raise MDLMUserError(f"{path}/config.json is not JSON ({e})") from None
    kind = cfg.get("model_type")
    _check_absorbing(kind, f"{path}/config.json (model_type)")
    if kind not in ("mdlm", "bd3lm"):
        raise MDLMUserError(f"{path}/config.json has model_type {kind!r}: the converter "
                            f"knows 'mdlm' and 'bd3lm'")
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        tensors = _read_safetensors(st)
    elif os.path.isfile(pt):
        tensors = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise MDLMUserError(f"{path} has config.json but neither model.safetensors nor "
                            f"pytorch_model.bin (sharded downloads are not supported)")
    params = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    block = None
    if kind == "bd3lm":
        if not cfg.get("cross_attn", True) or cfg.get("causal", False) or \
                not cfg.get("adaln", True):
            raise MDLMUserError(f"{path}: a BD3-LM without its [x_t, x_0] cross-attention "
                                f"and adaLN (an AR model) does not convert")
        block = cfg.get("block_size")
    return Reference(params, heads=cfg.get("n_heads"),
                     time_conditioning=cfg.get("time_conditioning", False),
                     block_size=block, length=cfg.get("model_length"),
                     dropout=cfg.get("dropout", 0.1), source=path, weights="as published")


def read_reference(path: str, use_ema: bool = True) -> Reference:
    """A reference checkpoint (Lightning file or HF directory) as a :class:`Reference`."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MDLMUserError(
                f"{path} is a directory without config.json: not a checkpoint layout the "
                f"converter knows (a Hugging Face directory has config.json + "
                f"model.safetensors or pytorch_model.bin)")
        return _read_hf(path)
    if not os.path.isfile(path):
        raise MDLMUserError(f"{path} does not exist")
    return _read_lightning(path, use_ema)


# ------------------------------------------------------------------ architecture


def infer_architecture(ref: Reference, heads: Optional[int] = None) -> dict:
    """Width, depth, vocabulary and conditioning width from the shapes; heads from
    ``heads`` or the config. Every shape must fit one DiT, else one clear error."""
    p = ref.params
    unknown = [k for k in p if _translate(k, _TO_OURS) is None and not _REFERENCE_BUFFERS.fullmatch(k)]
    if unknown:
        raise MDLMUserError(f"{ref.source}: tensors no DiT of ours has: "
                            f"{', '.join(sorted(unknown)[:6])}"
                            f"{' ...' if len(unknown) > 6 else ''}")
    if "vocab_embed.embedding" not in p or p["vocab_embed.embedding"].dim() != 2:
        raise MDLMUserError(f"{ref.source}: no 2-d vocab_embed.embedding: not a DiT")
    vocab, dim = p["vocab_embed.embedding"].shape
    layers = len({int(m.group(1)) for k in p for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    cond = p["sigma_map.mlp.0.weight"].shape[0] if "sigma_map.mlp.0.weight" in p else None
    heads = heads or ref.heads
    if heads is None:
        raise MDLMUserError(f"{ref.source}: the config does not give the number of "
                            f"attention heads and the shapes cannot tell: pass --heads N "
                            f"(the released OWT models have 12)")
    if dim % heads or (dim // heads) % 2:
        raise MDLMUserError(f"{ref.source}: width {dim} does not split into {heads} heads "
                            f"of an even size: check --heads / the config's n_heads")
    arch = dict(vocab=int(vocab), dim=int(dim), layers=layers, heads=int(heads),
                cond_dim=cond)
    expected = {"sigma_map.mlp.0.weight": (cond, FREQ_DIM), "sigma_map.mlp.0.bias": (cond,),
                "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,),
                "output_layer.norm_final.weight": (dim,),
                "output_layer.linear.weight": (vocab, dim), "output_layer.linear.bias": (vocab,),
                "output_layer.adaLN_modulation.weight": (2 * dim, cond),
                "output_layer.adaLN_modulation.bias": (2 * dim,)}
    for i in range(layers):
        b = f"blocks.{i}."
        expected.update({
            b + "norm1.weight": (dim,), b + "attn_qkv.weight": (3 * dim, dim),
            b + "attn_out.weight": (dim, dim), b + "norm2.weight": (dim,),
            b + "mlp.0.weight": (4 * dim, dim), b + "mlp.0.bias": (4 * dim,),
            b + "mlp.2.weight": (dim, 4 * dim), b + "mlp.2.bias": (dim,),
            b + "adaLN_modulation.weight": (6 * dim, cond),
            b + "adaLN_modulation.bias": (6 * dim,)})
    for name, shape in expected.items():
        got = p.get(name)
        if got is None or tuple(got.shape) != tuple(shape):
            raise MDLMUserError(
                f"{ref.source}: {name} has shape "
                f"{None if got is None else tuple(got.shape)}, but a DiT of width {dim}, "
                f"{layers} blocks and conditioning width {cond} needs {tuple(shape)}: no "
                f"architecture the converter knows explains these shapes")
    return arch


# ------------------------------------------------------------------- vocabulary


def reference_order(vocab: int, eos_id: int, mask_id: int):
    """The reference id behind each fairseq row, in fairseq's dictionary order: None
    for fairseq's <s>, <pad>, <unk>; eos_id for </s>; k for the symbol "k"; mask_id
    for <mask> (last)."""
    from fairseq.data import Dictionary

    d = Dictionary()
    ids = [None] * d.nspecial
    ids[d.eos()] = eos_id
    for k in range(vocab):
        if k not in (eos_id, mask_id):
            d.add_symbol(str(k))
            ids.append(k)
    ids.append(mask_id)
    return d, ids


def _permute_rows(t: torch.Tensor, ids) -> torch.Tensor:
    out = t.new_zeros((len(ids),) + tuple(t.shape[1:]))
    have = [i for i, k in enumerate(ids) if k is not None]
    out[have] = t[[ids[i] for i in have]]
    return out


# ---------------------------------------------------------------------- writing


def _primitive(x):
    if isinstance(x, dict):
        return {k: _primitive(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_primitive(v) for v in x]
    if isinstance(x, enum.Enum):
        return x.value if isinstance(x.value, (str, int, float, bool)) else str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def fairseq_cfg(out_dir: str, arch: dict, ref: Reference, window: int) -> dict:
    """The full fairseq config (every section, fairseq's and the plugin's defaults) of
    this model, as plain containers (a checkpoint that loads with weights_only)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    argv = [out_dir, "--user-dir", os.path.dirname(os.path.abspath(__file__)),
            "--task", "masked_diffusion", "--criterion", "mdlm", "--arch", "mdlm_base",
            "--embed-dim", str(arch["dim"]), "--layers", str(arch["layers"]),
            "--attention-heads", str(arch["heads"]), "--cond-dim", str(arch["cond_dim"]),
            "--dropout", str(ref.dropout), "--max-positions", str(window),
            "--tokens-per-sample", str(window)]
    if ref.time_conditioning:
        argv.append("--time-conditioning")
    if ref.block_size is not None:
        argv += ["--block-size", str(ref.block_size)]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True)
    cfg["common"]["user_dir"] = None        # users pass --user-dir; no machine path
    return _primitive(cfg)


def convert(ref_path: str, out_dir: str, *, use_ema: bool = True, heads: Optional[int] = None,
            eos_id: Optional[int] = None, mask_id: Optional[int] = None,
            window: Optional[int] = None) -> dict:
    """Write OUT_DIR/checkpoint.pt and OUT_DIR/dict.txt; returns a summary dict."""
    from .diffusion.blocks import check_block_size
    from .models.backbone import DiT
    from .models.mdlm import dictionary_fingerprint
    from .tasks.masked_diffusion import add_mask_symbol

    ref = read_reference(ref_path, use_ema)
    arch = infer_architecture(ref, heads)
    vocab = arch["vocab"]
    eos_id = vocab - 2 if eos_id is None else eos_id
    mask_id = vocab - 1 if mask_id is None else mask_id
    if not (0 <= eos_id < vocab and 0 <= mask_id < vocab and eos_id != mask_id):
        raise MDLMUserError(f"--eos-id {eos_id} / --mask-id {mask_id} must be two "
                            f"different ids of the {vocab}-row vocabulary")
    window = window or ref.length or 1024
    block = ref.block_size
    if block is not None and int(block) >= window:
        block = None                        # one block over the window: MDLM
    if block is not None:
        if ref.time_conditioning:
            raise MDLMUserError(
                f"{ref_path}: a BD3-LM with time conditioning: the reference conditions "
                f"the clean copy on the noisy blocks' mean sigma, ours on 0; not "
                f"converted (the released BD3-LMs have no time conditioning)")
        try:
            check_block_size(int(block), window)
        except ValueError as e:
            raise MDLMUserError(f"{ref_path}: block size {block}: {e}") from None
        ref.block_size = int(block)
    else:
        ref.block_size = None
    if ref.length is not None and window > ref.length:
        raise MDLMUserError(f"--window {window} exceeds the {ref.length} positions the "
                            f"model was trained on")

    dictionary, ids = reference_order(vocab, eos_id, mask_id)
    os.makedirs(out_dir, exist_ok=True)
    dictionary.save(os.path.join(out_dir, "dict.txt"))
    add_mask_symbol(dictionary)
    assert len(dictionary) == len(ids)

    net = DiT(vocab_size=len(ids), dim=arch["dim"], layers=arch["layers"], heads=arch["heads"],
              cond_dim=arch["cond_dim"], dropout=ref.dropout, max_positions=window,
              time_conditioning=ref.time_conditioning)
    ours = {}
    for name, t in ref.params.items():
        target = _translate(name, _TO_OURS)
        if target is None:
            continue
        t = t.float()
        if target in _VOCAB_ROWS:
            t = _permute_rows(t, ids)
        ours[target] = t
    unseen = [i for i, k in enumerate(ids) if k is None]
    ours["logit_mask"] = torch.zeros(len(ids))
    ours["logit_mask"][unseen] = float("-inf")
    net.load_state_dict(ours, strict=True)
    state = {"backbone." + k: v.clone() for k, v in net.state_dict().items()}
    state["dictionary_version"] = dictionary_fingerprint(dictionary)

    cfg = fairseq_cfg(os.path.abspath(out_dir), arch, ref, window)
    ckpt = {
        "cfg": cfg, "args": None, "model": state, "criterion": None,
        "optimizer_history": [{"criterion_name": "MDLMCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {"tokens_per_sample": window},
        "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": None,
                        "converted_from": {"source": os.path.basename(os.path.normpath(
                            ref_path)), "weights": ref.weights}},
        "last_optimizer_state": None,
    }
    torch.save(ckpt, os.path.join(out_dir, "checkpoint.pt"))
    return {"vocab": len(ids), "dim": arch["dim"], "layers": arch["layers"],
            "heads": arch["heads"], "cond_dim": arch["cond_dim"],
            "time_conditioning": ref.time_conditioning, "block_size": ref.block_size,
            "window": window, "weights": ref.weights,
            "unseen": [dictionary[i] for i in unseen]}


# -------------------------------------------------------------------- reverse


def convert_back(ckpt_path: str, out_dir: str) -> dict:
    """Our checkpoint of a converted (GPT-2 id) dictionary -> the reference's Hugging
    Face layout (config.json + pytorch_model.bin, ``backbone.*`` keys, rows in reference
    id order). The dictionary must be the converter's: symbols "k" plus </s> and <mask>."""
    if not os.path.isfile(ckpt_path):
        raise MDLMUserError(f"{ckpt_path} does not exist")
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(ckpt_path)
    except Exception as e:          # noqa: BLE001  (any unreadable file: one error)
        raise MDLMUserError(f"cannot read {ckpt_path} as a fairseq checkpoint ({e})") from None
    if not isinstance(state, dict) or "model" not in state or state.get("cfg") is None:
        raise MDLMUserError(f"{ckpt_path} is not a fairseq checkpoint of the mdlm model")
    model_cfg, task_cfg = state["cfg"]["model"], state["cfg"]["task"]
    dict_path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "dict.txt")
    if not os.path.isfile(dict_path):
        raise MDLMUserError(f"no dict.txt next to {ckpt_path}: copy the dict.txt of the "
                            f"model's data directory there")
    d = Dictionary.load(dict_path)
    symbols = d.symbols[d.nspecial:]
    if not all(s.isdigit() for s in symbols):
        raise MDLMUserError(f"{dict_path} is not a GPT-2 id dictionary (symbols '0', '1', "
                            f"...): the reference has no tokenizer for this model")
    vocab = len(symbols) + 2
    missing = sorted(set(range(vocab)) - {int(s) for s in symbols})
    if len(missing) != 2:
        raise MDLMUserError(f"{dict_path}: its ids leave {len(missing)} of 0..{vocab - 1} "
                            f"free, not exactly <|endoftext|> and the mask")
    eos_id, mask_id = missing
    # the fairseq row of each reference id (<mask> follows dict.txt's symbols)
    order = [d.eos() if k == eos_id else len(d) if k == mask_id else d.index(str(k))
             for k in range(vocab)]
    out = {}
    for name, t in state["model"].items():
        if not name.startswith("backbone."):
            continue
        target = _translate(name[len("backbone."):], _TO_REFERENCE)
        if target is not None:
            out["backbone." + target] = t[order].clone() if name[len("backbone."):] in \
                _VOCAB_ROWS else t
    heads = int(model_cfg["attention_heads"])
    dim = int(model_cfg["embed_dim"])
    out["backbone.rotary_emb.inv_freq"] = 1.0 / (10000 ** (
        torch.arange(0, dim // heads, 2).float() / (dim // heads)))
    block = model_cfg.get("block_size")
    cfg = {"vocab_size": vocab, "model_length": int(task_cfg["tokens_per_sample"]),
           "hidden_dim": dim, "cond_dim": int(model_cfg["cond_dim"]),
           "n_blocks": int(model_cfg["layers"]), "n_heads": heads,
           "dropout": float(model_cfg["dropout"]),
           "time_conditioning": bool(model_cfg["time_conditioning"])}
    if block is None:
        cfg.update(model_type="mdlm", architectures=["MDLM"])
    else:
        cfg.update(model_type="bd3lm", architectures=["BD3LM"], block_size=int(block),
                   cross_attn=True, adaln=True, causal=False, attn_backend="sdpa")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    torch.save(out, os.path.join(out_dir, "pytorch_model.bin"))
    return cfg


# ----------------------------------------------------------------------- CLI


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m mdlm_plugin.convert",
        description="Convert a released MDLM / BD3-LM checkpoint (Lightning .ckpt or "
                    "Hugging Face directory) into OUT_DIR/checkpoint.pt + OUT_DIR/dict.txt "
                    "for fairseq (--reverse: our checkpoint into the reference's Hugging "
                    "Face layout). See docs/pretrained.md.")
    ap.add_argument("ref", metavar="REF", help="reference .ckpt or HF directory "
                                                "(--reverse: our checkpoint.pt)")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    ap.add_argument("--no-ema", action="store_true",
                    help="Lightning checkpoints: the raw weights instead of the EMA ones")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads (default: the checkpoint's config)")
    ap.add_argument("--eos-id", type=int, default=None,
                    help="reference id of <|endoftext|> (default: vocabulary size - 2, "
                         "50256 for GPT-2)")
    ap.add_argument("--mask-id", type=int, default=None,
                    help="reference id of the mask (default: the last id)")
    ap.add_argument("--window", type=int, default=None,
                    help="--tokens-per-sample saved with the model (default: the "
                         "reference's model length)")
    ap.add_argument("--reverse", action="store_true",
                    help="convert our checkpoint (with dict.txt beside it) back into the "
                         "reference's Hugging Face layout")
    args = ap.parse_args(argv)
    if args.reverse:
        cfg = convert_back(args.ref, args.out_dir)
        print(f"wrote {args.out_dir}/config.json and pytorch_model.bin ({cfg['model_type']}, "
              f"{cfg['n_blocks']} x {cfg['hidden_dim']})")
        return
    info = convert(args.ref, args.out_dir, use_ema=not args.no_ema, heads=args.heads,
                   eos_id=args.eos_id, mask_id=args.mask_id, window=args.window)
    kind = "MDLM" if info["block_size"] is None else f"BD3-LM, blocks of {info['block_size']}"
    print(f"wrote {args.out_dir}/checkpoint.pt and dict.txt: {kind}, {info['layers']} x "
          f"{info['dim']}, {info['heads']} heads, cond {info['cond_dim']}, time conditioning "
          f"{'on' if info['time_conditioning'] else 'off'}, window {info['window']}, "
          f"{info['vocab']} symbols ({info['weights']} weights); never predicted: "
          f"{' '.join(info['unseen'])}")


if __name__ == "__main__":
    try:
        main()
    except MDLMUserError as e:
        print(f"mdlm_plugin.convert: error: {e}", file=sys.stderr)
        sys.exit(1)
