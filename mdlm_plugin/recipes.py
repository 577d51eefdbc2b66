"""How each model family is trained and evaluated with fairseq's own CLIs: command lines
from a family name, a size and overrides, shared by examples/compare, the benchmarks and
the tests (one place for the task, criterion, architecture and sizing flags), and the
readers of what those CLIs log (``--log-format json``).

A family is a row of ``FAMILIES``: its task, criterion, default architecture, whether it
needs ``--user-dir``, how a ``Size`` becomes flags, and which CLI evaluates it. A
``Variant`` (a row of the comparison) is a family plus model/criterion flags placed after
the size flags: the ablations of ``VARIANTS``, and ``bd3_N`` (``--block-size N``).

Pure command-line building: no fairseq import, so importing this module costs nothing
and is not part of loading the plugin (``--user-dir`` does not import it).
"""
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PLUGIN = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Size:
    """Depth, width and heads; ``None`` leaves a flag to the architecture's default."""
    layers: int
    embed_dim: int
    heads: int
    cond_dim: Optional[int] = None        # MDLM backbone: adaLN conditioning width
    max_positions: Optional[int] = None   # MDLM backbone: longest sequence
    ffn: Optional[int] = None             # transformer_lm: FFN width (default 4 x width, MDLM's)
    decoder_layers: Optional[int] = None  # encoder-decoder models: decoder depth (default: layers)

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.embed_dim


# the mdlm_* / mdlm_ar_* architectures of models/mdlm.py (tests/test_recipes.py checks
# that they agree, and that the CPU recipe and the hydra recipe train ``tiny``)
ARCH_SIZES = {"tiny": Size(4, 256, 4, cond_dim=128, max_positions=512),
              "small": Size(12, 768, 12, cond_dim=128, max_positions=1024),
              "medium": Size(24, 1024, 16, cond_dim=128, max_positions=1024)}


def _backbone_flags(size: Size, dropout) -> List:
    flags = ["--layers", size.layers, "--embed-dim", size.embed_dim,
             "--attention-heads", size.heads]
    flags += ["--cond-dim", size.cond_dim] if size.cond_dim is not None else []
    flags += ["--dropout", dropout] if dropout is not None else []
    flags += ["--max-positions", size.max_positions] if size.max_positions is not None else []
    return flags


def _transformer_lm_flags(size: Size, dropout) -> List:
    # fairseq's transformer_lm defaults --decoder-input-dim / --decoder-output-dim to 512,
    # which would add 512-wide embeddings and projections: both are set to the width
    d = size.embed_dim
    flags = ["--decoder-layers", size.layers, "--decoder-embed-dim", d,
             "--decoder-input-dim", d, "--decoder-output-dim", d,
             "--decoder-ffn-embed-dim", size.ffn_dim, "--decoder-attention-heads", size.heads]
    return flags + (["--dropout", dropout] if dropout is not None else [])


def _encoder_decoder_flags(size: Size, dropout) -> List:
    """fairseq's transformer / cmlm_transformer: ``layers`` encoder and ``decoder_layers``
    decoder layers of one width, heads and FFN, and one embedding table for the source,
    the target and the output (``--share-all-embeddings``: a joined dictionary, as the
    MDLM translation model's single table)."""
    flags = ["--share-all-embeddings"]
    for side, n in (("encoder", size.layers), ("decoder", size.decoder_layers or size.layers)):
        flags += [f"--{side}-layers", n, f"--{side}-embed-dim", size.embed_dim,
                  f"--{side}-ffn-embed-dim", size.ffn_dim, f"--{side}-attention-heads", size.heads]
    return flags + (["--dropout", dropout] if dropout is not None else [])


@dataclass(frozen=True)
class Family:
    task: str
    criterion: str
    arch: str                              # default architecture
    plugin: bool                           # needs --user-dir mdlm_plugin
    size_flags: Callable[[Size, object], List]
    evaluator: str                         # "validate" (a bound), "eval_lm" (exact) or
                                           # "generate" (translation: fairseq-generate, BLEU)
    flags: Tuple = ()                      # the family's own flags, right after --arch


FAMILIES: Dict[str, Family] = {
    "mdlm": Family("masked_diffusion", "mdlm", "mdlm_tiny", True, _backbone_flags, "validate"),
    "mdlm_ar": Family("language_modeling", "cross_entropy", "mdlm_ar_tiny", True,
                      _backbone_flags, "eval_lm"),
    "transformer_lm": Family("language_modeling", "cross_entropy", "transformer_lm", False,
                             _transformer_lm_flags, "eval_lm"),
    "sedd": Family("masked_diffusion", "sedd", "mdlm_tiny", True, _backbone_flags, "validate"),
}


# translation (examples/translation/compare.py), on fairseq-preprocess --joined-dictionary
# data: fairseq's autoregressive transformer and its CMLM (mask-predict: the target masked
# at a uniform rate, <unk> as the mask, a length predicted from the encoder; fairseq's
# NAT recipe's BERT initialisation), each with label smoothing 0.1, and MDLM's
# conditional model. Not rows of the LM comparison (VARIANTS).
TRANSLATION_FAMILIES: Dict[str, Family] = {
    "translation_transformer": Family(
        "translation", "label_smoothed_cross_entropy", "transformer", False,
        _encoder_decoder_flags, "generate", ("--label-smoothing", 0.1)),
    "translation_cmlm": Family(
        "translation_lev", "nat_loss", "cmlm_transformer", False, _encoder_decoder_flags,
        "generate", ("--noise", "random_mask", "--apply-bert-init", "--label-smoothing", 0.1)),
    "translation_mdlm": Family(
        "translation_masked_diffusion", "mdlm", "mdlm_translation_tiny", True,
        _backbone_flags, "generate"),
}


@dataclass(frozen=True)
class Variant:
    """A named model: a family, the flags that follow its size flags, and whether the
    comparison samples from it (``--time-conditioning`` rules out the cached sampler)."""
    family: str
    flags: Tuple = ()
    sampled: bool = True


# the paper's ablations of MDLM (Sahoo et al. 2024, Table 8), trained with existing flags
VARIANTS: Dict[str, Variant] = {
    **{name: Variant(name) for name in FAMILIES},
    "mdlm_discrete": Variant("mdlm", ("--discrete-steps", 1000), sampled=False),
    "mdlm_iid": Variant("mdlm", ("--time-sampling", "iid"), sampled=False),
    "mdlm_timecond": Variant("mdlm", ("--time-conditioning",), sampled=False),
}


def variant(name: str) -> Variant:
    """A row of ``VARIANTS``, or ``bd3_N``: block diffusion with blocks of N tokens."""
    m = re.fullmatch(r"bd3_([1-9][0-9]*)", name)
    if m:
        return Variant("mdlm", ("--block-size", int(m.group(1))))
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(VARIANTS)}, bd3_N")
    return VARIANTS[name]


def family(name: str) -> Family:
    known = {**FAMILIES, **TRANSLATION_FAMILIES}
    if name not in known:
        raise ValueError(f"unknown model family {name!r}: choose one of {', '.join(known)}")
    return known[name]


def size_flags(name: str, size: Size, dropout=None) -> List[str]:
    """A family's flags for ``size`` (strings)."""
    return [str(x) for x in family(name).size_flags(size, dropout)]


def tool(name: str) -> List[str]:
    """A fairseq console script: the one beside this interpreter when there is one."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return [beside] if os.access(beside, os.X_OK) else [name]


def model_flags(name: str, size: Optional[Size] = None, *, arch: Optional[str] = None,
                dropout=None, model_extra: Sequence = (), after_size: Sequence = (),
                user_dir: Optional[bool] = None) -> List:
    """Task, criterion, architecture and size flags of a family. ``size=None`` keeps the
    architecture's sizes (``dropout`` is still passed when given); ``model_extra`` comes
    right after ``--arch``, ``after_size`` after the size flags; ``user_dir`` forces
    ``--user-dir`` (e.g. for adamw_torch)."""
    f = family(name)
    flags = ["--user-dir", PLUGIN] if (f.plugin if user_dir is None else user_dir) else []
    flags += ["--task", f.task, "--criterion", f.criterion, "--arch", arch or f.arch,
              *f.flags, *model_extra]
    if size is not None:
        return flags + f.size_flags(size, dropout) + list(after_size)
    return flags + (["--dropout", dropout] if dropout is not None else []) + list(after_size)


def data_flags(tokens_per_sample, batch_size) -> List:
    return ["--tokens-per-sample", tokens_per_sample, "--sample-break-mode", "none",
            "--batch-size", batch_size]


def adam_inverse_sqrt(lr, warmup_updates, weight_decay=0.01) -> List:
    """The paper's optimizer and schedule (Adam, betas (0.9, 0.98), clip 1, inverse-sqrt
    warm-up), as examples/ptb/train_mdlm.sh uses them."""
    flags = ["--optimizer", "adam", "--adam-betas", "(0.9,0.98)"]
    flags += ["--weight-decay", weight_decay] if weight_decay is not None else []
    return flags + ["--clip-norm", 1.0, "--lr", lr, "--lr-scheduler", "inverse_sqrt",
                    "--warmup-updates", warmup_updates]


def train_command(name: str, data: str, protocol: Sequence = (), *, device: Optional[str] = "cpu",
                  overrides: Sequence = (), exe: Optional[Sequence[str]] = None,
                  **model) -> List[str]:
    """``exe DATA <model_flags(name, **model)> <protocol> [--cpu] <overrides>``, as strings.
    ``protocol``: data, optimizer, schedule, logging flags of the experiment."""
    cmd = list(exe or tool("fairseq-train")) + [data] + model_flags(name, **model)
    cmd += list(protocol) + (["--cpu"] if device == "cpu" else []) + list(overrides)
    return [str(x) for x in cmd]


def eval_command(name: str, data: str, checkpoint: str, *, batch_size, tokens_per_sample,
                 eval_passes: int = 1, split: str = "test", device: str = "cpu") -> List[str]:
    """Test-split evaluation of a checkpoint: fairseq-validate (the MDLM bound, averaged
    over ``eval_passes`` passes, JSON log) or fairseq-eval-lm (exact AR perplexity)."""
    f = family(name)
    dev = ["--cpu"] if device == "cpu" else []
    if f.evaluator == "validate":
        cmd = tool("fairseq-validate") + [
            data, "--user-dir", PLUGIN, "--task", f.task, "--path", checkpoint,
            "--valid-subset", split, "--batch-size", batch_size,
            "--tokens-per-sample", tokens_per_sample, "--eval-passes", eval_passes,
            *dev, "--log-format", "json"]
    else:
        cmd = tool("fairseq-eval-lm") + (["--user-dir", PLUGIN] if f.plugin else []) + [
            data, "--path", checkpoint, "--gen-subset", split, "--batch-size", batch_size,
            "--tokens-per-sample", tokens_per_sample, *dev]
    return [str(x) for x in cmd]


def translate_command(name: str, data: str, checkpoint: str, decoding: Sequence = (), *,
                      batch_size, split: str = "test", post_process: Optional[str] = None,
                      device: str = "cpu") -> List[str]:
    """fairseq-generate of a translation family's checkpoint on ``split``, scored with
    ``--scoring sacrebleu`` on text detokenized by ``--post-process`` (e.g.
    sentencepiece); ``decoding``: the decoder's flags (``--beam K``, mask-predict's
    ``--iter-decode-*``, the MDLM sampler's). Batches are never rounded to a multiple
    (``--required-batch-size-multiple 1``): every sentence of the split is translated."""
    f = family(name)
    cmd = tool("fairseq-generate") + [data] + (["--user-dir", PLUGIN] if f.plugin else []) + [
        "--task", f.task, "--path", checkpoint, "--gen-subset", split,
        "--batch-size", batch_size, "--required-batch-size-multiple", 1,
        "--scoring", "sacrebleu", *decoding]
    cmd += ["--post-process", post_process] if post_process else []
    return [str(x) for x in cmd + (["--cpu"] if device == "cpu" else [])]


# --------------------------------------------------------------------------- fairseq logs

def json_records(text: str, tag: str) -> List[Dict[str, object]]:
    """The JSON objects fairseq logs under ``tag`` with ``--log-format json``
    (``train_inner``, ``train``, ``valid``, or the split fairseq-validate scored), in
    order; numbers stay as fairseq formatted them (strings or numbers)."""
    marker = f"| {tag} | {{"
    out = []
    for line in text.splitlines():
        i = line.find(marker)
        if i >= 0:
            out.append(json.loads(line[i + len(marker) - 1:]))
    return out


def numbers(record: Dict[str, object]) -> Dict[str, float]:
    """A JSON log record's numeric fields as floats (fairseq logs most as strings)."""
    out = {}
    for k, v in record.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def eval_lm_result(text: str) -> Optional[Dict[str, float]]:
    """fairseq-eval-lm's result. It has no JSON output: its last two lines
    ("Evaluated N tokens ...", "Loss (base 2): X, Perplexity: Y") are all it reports."""
    n = re.search(r"Evaluated ([\d,]+) tokens", text)
    loss = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", text)
    if not (n and loss):
        return None
    return {"tokens": int(n.group(1).replace(",", "")), "bits": float(loss.group(1)),
            "ppl": float(loss.group(2))}


# what fairseq logs only as human-readable text (at start-up; no --log-format changes it)

def logged_params(text: str) -> Optional[int]:
    """The parameter count fairseq-train logs ("num. shared model params: N")."""
    m = re.search(r"num\. shared model params: ([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else None


def logged_dictionary_size(text: str) -> Optional[int]:
    """The size of the task's dictionary ("dictionary: N types")."""
    m = re.search(r"dictionary: (\d+) types", text)
    return int(m.group(1)) if m else None


def logged_gpu_memory_gib(text: str) -> Optional[float]:
    """The GPU's total memory, from fairseq's CUDA environment line ("total memory = X GB")."""
    m = re.search(r"total memory = ([\d.]+) GB", text)
    return float(m.group(1)) if m else None


def logged_model_config(text: str) -> Dict[str, object]:
    """The ``'model': {...}`` section of the config fairseq-train logs: a Python repr with
    non-literal values, not JSON (fairseq logs its config no other way)."""
    m = re.search(r"'model': \{([^{}]*)\}", text)
    return {key: _number(value.strip().strip("'")) for key, value in
            re.findall(r"'(\w+)': ('[^']*'|[^,\[\]]+)", m.group(1) if m else "")}


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text
