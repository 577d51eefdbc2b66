"""Generative evaluation, shared by the comparison script (examples/compare) and the
sampling benchmark: load a checkpoint with fairseq's own loader, draw unconditional
samples from an MDLM (through the task's generator) or from an autoregressive fairseq
language model (ancestral sampling with incremental decoding), and score token
sequences with an autoregressive model (generative perplexity).

Conventions. An autoregressive sample is drawn after ``</s>``. Scoring puts every source
on the same footing:
  * test perplexity of an AR model (``ar_block_perplexity``): each block of the split is
    read after ``</s>`` only, x_1..x_L scored as sum_i -log p(x_i | </s>, x_<i): exactly
    the context an MDLM block has (nothing from the previous block), while
    fairseq-eval-lm's TokenBlockDataset gives every block but the first the real token
    before it;
  * generative perplexity (``generative_perplexity``): the first token of every sample
    is context only, x_2..x_L scored given x_1, whatever the source (AR samples start
    after ``</s>``, MDLM samples and test blocks mid-sentence), as the reference
    implementation does.
Perplexities are exp(total NLL in nats / total tokens scored), nats throughout.
"""
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from .diffusion.samplers import sample_categorical


def load_checkpoint(path: str, data_dir: str, overrides: Optional[Dict] = None):
    """(model in eval mode, task, facts) through fairseq's checkpoint loader, with the
    data directory replaced by ``data_dir``."""
    from fairseq import checkpoint_utils
    arg_overrides = {"data": data_dir, **(overrides or {})}
    state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    history = state.get("optimizer_history") or [{}]
    cfg = state.get("cfg") or {}
    extra = state.get("extra_state") or {}
    val = extra.get("val_loss", extra.get("best"))
    facts = {"num_updates": history[-1].get("num_updates"),
             "valid_loss_bits": float(val) if isinstance(val, (int, float)) else None,
             "arch": (cfg["model"].get("arch") or cfg["model"].get("_name")) if cfg else None,
             "task": cfg["task"].get("_name") if cfg else None,
             "arg_overrides": arg_overrides}
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides=arg_overrides, state=state)
    del state
    model = models[0]
    model.eval()
    facts["params"] = sum(p.numel() for p in model.parameters())
    facts["tokens_per_sample"] = int(task.args.tokens_per_sample)
    return model, task, facts


def batches(n: int, size: int):
    """Sizes of the successive batches that split n items into batches of at most size."""
    return [min(size, n - i) for i in range(0, n, size)]


@torch.no_grad()
def ar_sequence_nll(model, tokens: torch.Tensor, bos: Optional[int] = None,
                    batch_size: int = 32) -> torch.Tensor:
    """Per-row total negative log-likelihood (nats, float64) of ``tokens`` (N, L) under
    the autoregressive fairseq LM ``model``. With ``bos`` each row is read after it and
    all L tokens are scored; without, the first token is context only and the L - 1
    tokens after it are scored."""
    model.eval()
    out = []
    for start in range(0, tokens.size(0), batch_size):
        x = tokens[start:start + batch_size]
        if bos is None:
            inputs, targets = x[:, :-1], x[:, 1:]
        else:
            inputs, targets = torch.cat([x.new_full((x.size(0), 1), bos), x[:, :-1]], 1), x
        net_output = model(inputs)
        lprobs = model.get_normalized_probs(net_output, log_probs=True).double()
        out.append(-lprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.cat(out)


def generative_perplexity(scorer, tokens: torch.Tensor, batch_size: int = 32) -> Dict[str, float]:
    """exp(mean NLL per scored token) of ``tokens`` (N, L) under the autoregressive
    ``scorer``, the first token of every row context only (L - 1 scored per row), with
    the standard error of the per-token NLL over the N rows (delta method for the
    perplexity)."""
    if tokens.size(1) < 2:
        raise ValueError("generative perplexity needs samples of at least 2 tokens")
    nll = ar_sequence_nll(scorer, tokens, None, batch_size)
    per_row = nll / (tokens.size(1) - 1)
    mean = float(per_row.mean())
    se = float(per_row.std(unbiased=True) / math.sqrt(len(per_row))) if len(per_row) > 1 else 0.0
    return {"ppl": math.exp(mean), "nll_per_token": mean, "nll_se": se,
            "ppl_se": se * math.exp(mean), "sequences": int(tokens.size(0)),
            "tokens": int(tokens.size(0) * (tokens.size(1) - 1))}


def ar_block_perplexity(model, stream: torch.Tensor, length: int, bos: int,
                        batch_size: int = 32) -> Dict[str, float]:
    """Perplexity of a token ``stream`` (1-D) cut into consecutive blocks of ``length``
    (the last one shorter if need be), each block read after ``bos`` only: the context
    an MDLM block has. Every token of the stream is scored once."""
    full = stream.numel() // length * length
    nll = ar_sequence_nll(model, stream[:full].view(-1, length), bos, batch_size).sum()
    if full < stream.numel():
        nll = nll + ar_sequence_nll(model, stream[full:].unsqueeze(0), bos).sum()
    total, n = float(nll), int(stream.numel())
    return {"ppl": math.exp(total / n), "nll": total, "tokens": n,
            "blocks": -(-n // length)}


@torch.no_grad()
def ar_samples(model, n: int, length: int, bos: int, seed: int, batch_size: int = 16,
               forbid: Sequence[int] = (), temperature: float = 1.0) -> torch.Tensor:
    """``n`` ancestral samples of exactly ``length`` tokens from an autoregressive
    fairseq LM, started after ``bos`` and decoded incrementally (fairseq's
    ``incremental_state``). ``</s>`` may be drawn (it separates sentences inside a
    block, as in the training data); tokens in ``forbid`` (pad, <s>) never are.
    Draws are float64 inverse-CDF with a seeded generator."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in batches(n, batch_size):
        seq = torch.full((b, 1), bos, dtype=torch.long)
        state: Dict = {}
        for _ in range(length):
            logits = model.decoder(seq, incremental_state=state)[0][:, -1].double()
            if temperature != 1.0:
                logits = logits / temperature
            if forbid:
                logits[:, list(forbid)] = -math.inf
            probs = torch.softmax(logits, dim=-1)
            seq = torch.cat([seq, sample_categorical(probs, g).unsqueeze(1)], dim=1)
        rows.append(seq[:, 1:])
    return torch.cat(rows)


def mdlm_samples(task, model, n: int, length: int, steps: int, sampler: str, seed: int,
                 batch_size: int = 16, semi_ar_stride: int = 0,
                 options: Optional[Dict] = None, top_p: float = 1.0
                 ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``n`` unconditional MDLM samples of ``length`` tokens through the task's own
    generator (what fairseq-generate / fairseq-interactive build), and its statistics
    (``scores``: each token's log-probability, what the P- lines print). ``options``:
    the task's sampler flags by their field names (``{"remdm_loop": True}``), set for
    these samples only; ``top_p``: fairseq's ``--sampling-topp`` (temperature is 1)."""
    from fairseq.dataclass.configs import GenerationConfig
    options = {"sampler": sampler, "steps": steps, "seed": seed, "gen_length": length,
               "semi_ar_stride": semi_ar_stride, **(options or {})}
    unknown = sorted(k for k in options if not hasattr(task.args, k))
    if unknown:
        raise ValueError(f"not sampler flags of task {type(task).__name__}: {unknown}")
    saved = {k: getattr(task.args, k) for k in options}
    try:
        for k, v in options.items():
            setattr(task.args, k, v)
        gen = task.build_generator([model], GenerationConfig(sampling_topp=top_p))
        hypos = []
        for b in batches(n, batch_size):
            hypos += [h[0] for h in gen.generate_from_prompts(
                [torch.empty(0, dtype=torch.long)] * b)]
    finally:
        for k, v in saved.items():
            setattr(task.args, k, v)
    st = gen.stats
    return torch.stack([h["tokens"] for h in hypos]), {
        "network_calls": st.network_calls, "row_calls": st.row_calls, "seconds": st.seconds,
        "mean_unigram_entropy": st.mean_unigram_entropy,
        "scores": torch.stack([h["positional_scores"] for h in hypos])}


def split_stream(data_dir: str, split: str) -> torch.Tensor:
    """The split as one 1-D token stream (``</s>`` ending every line), as
    TokenBlockDataset reads it with ``--sample-break-mode none``."""
    from fairseq.data import data_utils
    ds = data_utils.load_indexed_dataset(os.path.join(data_dir, split), None)
    if ds is None:
        raise FileNotFoundError(f"no split {split!r} in {data_dir}")
    return torch.cat([ds[i].long() for i in range(len(ds))])


def data_blocks(data_dir: str, split: str, length: int, n: Optional[int] = None) -> torch.Tensor:
    """The split's consecutive full blocks of ``length`` tokens (what the models were
    trained to imitate, </s> included), the first ``n`` of them when given."""
    flat = split_stream(data_dir, split)
    blocks = flat[: flat.numel() // length * length].view(-1, length)
    return blocks if n is None else blocks[:n]

