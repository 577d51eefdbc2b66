"""The autoregressive twin (``mdlm_ar``): causal DiT, KV cache, fairseq's LM tools."""
import argparse
import json
import re
from types import SimpleNamespace

import pytest
import torch
from fairseq import search
from fairseq.data import Dictionary
from fairseq.models import FairseqIncrementalDecoder
from fairseq.sequence_generator import SequenceGenerator

from conftest import USER_DIR, fairseq_cli
from mdlm_plugin.errors import MDLMUserError
from mdlm_plugin.models.backbone import DiT, KVCache
from mdlm_plugin.models.mdlm import MDLMConfig, MDLMModel, mdlm_medium, mdlm_small, mdlm_tiny
from mdlm_plugin.models.mdlm_ar import (MDLMARConfig, MDLMARDecoder, MDLMARModel,
                                        mdlm_ar_medium, mdlm_ar_small, mdlm_ar_tiny)

V, L = 40, 16


def _randomize(module, std=0.3):
    """adaLN-Zero starts every block as the identity and the head at zero: random
    weights make the checks below see the attention at all."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.eval()


def _causal_dit(max_positions=L):
    return _randomize(DiT(V, dim=32, layers=2, heads=2, cond_dim=8, dropout=0.0,
                          max_positions=max_positions, causal=True))


def _dictionary(n=30):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def _ar_model(d, max_positions=24, std=0.3):
    cfg = MDLMARConfig(embed_dim=32, layers=2, attention_heads=2, cond_dim=8, dropout=0.0,
                       max_positions=max_positions)
    return _randomize(MDLMARModel(MDLMARDecoder(cfg, d), d), std)


# ---------------------------------------------------------------- backbone and cache

def test_causal_backbone_is_causal():
    model = _causal_dit()
    x = torch.randint(0, V, (3, L))
    with torch.no_grad():
        base = model(x)
        for i in (0, 5, L - 1):
            y = x.clone()
            y[:, i] = (y[:, i] + 1) % V
            diff = (model(y) - base).abs().amax(dim=(0, 2))
            assert torch.all(diff[:i] == 0), (i, diff)
            assert diff[i] > 1e-3                # the change is seen where it is allowed


def test_incremental_decoding_equals_the_full_forward():
    model = _causal_dit()
    x = torch.randint(0, V, (3, L))
    with torch.no_grad():
        full = model(x)
        cache, pieces, start = KVCache(), [], 0
        for end in (1, 2, 7, 8, 13, L):          # single tokens and chunks, from empty
            pieces.append(model(x[:, start:end], cache=cache))
            assert cache.length == end
            start = end
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)

        # reordering keeps the rows' caches: continue rows 2 and 0 only
        cache, order = KVCache(), torch.tensor([2, 0])
        model(x[:, :9], cache=cache)
        cache.reorder(order)
        torch.testing.assert_close(model(x[order, 9:], cache=cache), full[order, 9:],
                                   atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="max_positions"):
            model(x[:, :1], cache=cache)         # 17 positions > 16


def test_cache_needs_a_causal_model_and_the_bidirectional_one_is_unchanged():
    torch.manual_seed(0)
    bidir = DiT(V, dim=32, layers=2, heads=2, cond_dim=8, dropout=0.0, max_positions=L)
    x = torch.randint(0, V, (2, L))
    with pytest.raises(ValueError, match="causal"):
        bidir(x, cache=KVCache())
    _randomize(bidir)
    with torch.no_grad():
        base = bidir(x)
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % V
        assert (bidir(y) - base)[:, 0].abs().max() > 1e-3     # sees the future


def test_right_padding_needs_no_mask_under_causal_attention():
    d = _dictionary()
    model = _ar_model(d)
    x = torch.randint(d.nspecial, len(d), (2, 10))
    padded = torch.cat([x, torch.full((2, 5), d.pad())], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[0][:, :10], model(x)[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- fairseq model

def test_fairseq_generator_scores_its_samples_like_the_full_forward():
    """fairseq's SequenceGenerator drives the KV cache (prompts of unequal length,
    rows dropped as they end); every token's score equals the full forward's."""
    d = _dictionary()
    model = _ar_model(d, std=0.15)
    assert isinstance(model.decoder, FairseqIncrementalDecoder)
    with torch.no_grad():
        model.decoder.backbone.final.head.bias[d.eos()] += 1.5    # some samples end early
    orders = []
    reorder = model.decoder.reorder_incremental_state
    model.decoder.reorder_incremental_state = \
        lambda state, order: (orders.append(order.numel()), reorder(state, order))[1]

    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    src = torch.full((len(prompts), 6), d.pad())
    src[:, 0] = d.eos()
    for i, p in enumerate(prompts):
        src[i, 1:1 + len(p)] = torch.tensor(p)
    sample = {"net_input": {"src_tokens": src,
                            "src_lengths": torch.tensor([len(p) + 1 for p in prompts])}}
    gen = SequenceGenerator([model], d, beam_size=1, search_strategy=search.Sampling(d),
                            max_len_b=12)
    torch.manual_seed(1)
    hypos = gen.generate([model], sample, prefix_tokens=src[:, 1:], bos_token=d.eos())

    assert min(orders) < len(prompts)            # the batch shrank mid-generation
    lengths = set()
    for prompt, (hypo, *_) in zip(prompts, hypos):
        tokens = hypo["tokens"]
        assert tokens[:len(prompt)].tolist() == prompt
        lengths.add(tokens.numel())
        inputs = torch.cat([torch.tensor([d.eos()]), tokens[:-1]])[None]
        with torch.no_grad():
            lprobs = model.get_normalized_probs(model(inputs), log_probs=True)[0]
        full = lprobs.gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(hypo["positional_scores"], full, atol=1e-5, rtol=0)
    assert len(lengths) > 1


def test_architectures_have_the_mdlm_sizes_and_parameters():
    keys = ("embed_dim", "layers", "attention_heads", "cond_dim", "dropout", "max_positions")
    for ar, mdlm in ((mdlm_ar_tiny, mdlm_tiny), (mdlm_ar_small, mdlm_small),
                     (mdlm_ar_medium, mdlm_medium)):
        a, b = argparse.Namespace(), argparse.Namespace()
        ar(a)
        mdlm(b)
        assert {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}

    # the same backbone, parameter for parameter (MDLM's vocabulary has <mask> too)
    d = _dictionary()
    ar_model = _ar_model(d)
    d_mask = _dictionary()
    d_mask.add_symbol("<mask>")
    cfg = MDLMConfig(embed_dim=32, layers=2, attention_heads=2, cond_dim=8, dropout=0.0,
                     max_positions=24)
    mdlm_shapes = {k: v.shape for k, v in MDLMModel(cfg, d_mask).backbone.state_dict().items()}
    ar_shapes = {k: v.shape for k, v in ar_model.decoder.backbone.state_dict().items()}
    assert mdlm_shapes.keys() == ar_shapes.keys()
    for k, shape in mdlm_shapes.items():
        vocab_rows = k in ("embed.weight", "final.head.weight", "final.head.bias",
                           "logit_mask")
        assert ar_shapes[k] == ((len(d),) + shape[1:] if vocab_rows else shape), k


def test_build_errors_are_clear():
    d = _dictionary()
    cfg = MDLMARConfig(embed_dim=32, layers=2, attention_heads=2, cond_dim=8,
                       max_positions=64)

    def task(**kw):
        base = dict(source_dictionary=d, target_dictionary=d,
                    args=SimpleNamespace(tokens_per_sample=64))
        return SimpleNamespace(**{**base, **kw})

    assert isinstance(MDLMARModel.build_model(cfg, task()), MDLMARModel)
    with pytest.raises(MDLMUserError, match="--tokens-per-sample 65 exceeds"):
        MDLMARModel.build_model(cfg, task(args=SimpleNamespace(tokens_per_sample=65)))
    with pytest.raises(MDLMUserError, match="--task language_modeling"):
        MDLMARModel.build_model(cfg, task(mask_index=30))
    with pytest.raises(MDLMUserError, match="--output-dictionary-size"):
        MDLMARModel.build_model(cfg, task(target_dictionary=_dictionary(10)))

    model = MDLMARModel.build_model(cfg, task())
    other = MDLMARModel.build_model(cfg, task(source_dictionary=_dictionary(31),
                                              target_dictionary=_dictionary(31)))
    with pytest.raises(MDLMUserError, match="different dictionary"):
        model.load_state_dict(other.state_dict())


# ---------------------------------------------------------------- fairseq CLIs

AR_TINY = ["--arch", "mdlm_ar_tiny", "--embed-dim", "64", "--layers", "2",
           "--attention-heads", "2", "--cond-dim", "32", "--tokens-per-sample", "32"]


@pytest.fixture(scope="module")
def trained_ar(ptb_tiny, tmp_path_factory):
    save = tmp_path_factory.mktemp("ar_ckpt")
    proc = fairseq_cli(
        "train", ptb_tiny, "--user-dir", USER_DIR, "--task", "language_modeling",
        "--criterion", "cross_entropy", *AR_TINY, "--batch-size", "16", "--optimizer", "adam",
        "--lr", "3e-3", "--max-update", "20", "--cpu", "--save-dir", save, "--seed", "3",
        "--log-format", "json", "--log-interval", "5", "--no-epoch-checkpoints",
        "--disable-validation", "--num-workers", "0")
    return save / "checkpoint_last.pt", proc.stdout + proc.stderr


def _eval_lm(data, ckpt):
    proc = fairseq_cli("eval_lm", data, "--user-dir", USER_DIR, "--task", "language_modeling",
                       "--path", ckpt, "--gen-subset", "test", "--tokens-per-sample", "32",
                       "--batch-size", "16", "--cpu", "--num-workers", "0")
    text = proc.stdout + proc.stderr
    n = int(re.search(r"Evaluated ([\d,]+) tokens", text).group(1).replace(",", ""))
    loss, ppl = map(float, re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)",
                                     text).groups())
    return n, loss, ppl


def test_training_lowers_the_loss(trained_ar):
    _, log = trained_ar
    inner = [json.loads(line[line.index("{"):]) for line in log.splitlines()
             if "| train_inner |" in line]
    assert len(inner) >= 4
    first, last = float(inner[0]["loss"]), float(inner[-1]["loss"])
    assert last < first - 1.0, (first, last)


def test_eval_lm_scores_the_same_tokens_as_validate_on_mdlm(ptb_tiny, trained_ar,
                                                           trained_tiny):
    n_ar, loss, ppl = _eval_lm(ptb_tiny, trained_ar[0])
    vocab = len(open(ptb_tiny / "dict.txt").readlines())
    assert ppl == pytest.approx(2 ** loss, rel=1e-3)
    assert 1 < ppl < vocab

    proc = fairseq_cli("validate", ptb_tiny, "--user-dir", USER_DIR, "--task",
                       "masked_diffusion", "--path", trained_tiny[0] / "checkpoint_best.pt",
                       "--valid-subset", "test", "--tokens-per-sample", "32", "--batch-size",
                       "16", "--required-batch-size-multiple", "1", "--cpu")
    line = [l for l in (proc.stdout + proc.stderr).splitlines() if "valid on 'test'" in l][-1]
    n_mdlm = int(re.search(r"\| wpb (\d+)", line).group(1))   # one aggregate: all tokens
    assert n_ar == n_mdlm


def test_interactive_sampling_continues_prompts(ptb_tiny, trained_ar, tmp_path):
    prompts = ["the company said", "mr.", "it is a very long prompt about the stock market"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    proc = fairseq_cli("interactive", ptb_tiny, "--user-dir", USER_DIR, "--task",
                       "language_modeling", "--path", trained_ar[0], "--tokens-per-sample", "32",
                       "--sampling", "--beam", "1", "--max-len-b", "12", "--batch-size", "3",
                       "--buffer-size", "3", "--seed", "1", "--cpu",
                       "--input", tmp_path / "prompts.txt")
    hypos = {}
    for line in proc.stdout.splitlines():
        if line.startswith("H-"):
            idx, _score, text = line.split("\t")
            hypos[int(idx[2:])] = text.split()
    assert sorted(hypos) == [0, 1, 2]
    vocab = {line.split()[0] for line in open(ptb_tiny / "dict.txt")}
    for i, prompt in enumerate(prompts):
        known = [w if w in vocab else "<unk>" for w in prompt.split()]
        assert hypos[i][:len(known)] == known
    assert any(len(hypos[i]) > len(prompts[i].split()) for i in hypos)    # new words


def test_block_scorer_agrees_with_eval_lm_where_both_read_only_eos(ptb_tiny, trained_ar):
    """fairseq-eval-lm's own scorer (SequenceScorer over TokenBlockDataset) and
    ``ar_block_perplexity`` agree on the split's first block, where both read `</s>`
    before it; on the second block eval-lm reads the first block's last token and the
    block scorer does not."""
    from fairseq.sequence_scorer import SequenceScorer
    from mdlm_plugin.generative_eval import (ar_block_perplexity, ar_sequence_nll,
                                             load_checkpoint, split_stream)
    model, task, _ = load_checkpoint(str(trained_ar[0]), str(ptb_tiny))
    task.load_dataset("test")
    ds = task.dataset("test")                  # what fairseq-eval-lm iterates over
    sample = ds.collater([ds[0], ds[1]])
    hypos = SequenceScorer(task.target_dictionary).generate([model], sample)
    eval_lm = {int(i): -float(h[0]["positional_scores"].double().sum())
               for i, h in zip(sample["id"], hypos)}
    assert sample["net_input"]["src_tokens"][sample["id"] == 0][0, 0] == task.dictionary.eos()

    stream = split_stream(str(ptb_tiny), "test")
    blocks = stream[:64].view(2, 32)
    ours = ar_sequence_nll(model, blocks, task.dictionary.eos())
    assert ours[0].item() == pytest.approx(eval_lm[0], rel=1e-5)
    assert abs(ours[1].item() - eval_lm[1]) > 1e-3      # eval-lm read across the boundary
    total = ar_block_perplexity(model, stream, 32, task.dictionary.eos())
    assert (total["tokens"], total["blocks"]) == (stream.numel(), -(-stream.numel() // 32))
