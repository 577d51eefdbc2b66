"""The comparison with the AR baselines: the generative-perplexity scorer and the AR
sampler on a bigram model whose answers are known by hand, and the one-command
comparison script end to end on a tiny budget."""
import json
import math
import subprocess
import sys

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel

from conftest import REPO
from mdlm_plugin.generative_eval import (ar_block_perplexity, ar_samples, ar_sequence_nll,
                                         generative_perplexity)


class BigramDecoder(FairseqIncrementalDecoder):
    """p(x_i | x_<i) = table[x_{i-1}]; under incremental decoding it reads only the
    newest token, as a real incremental decoder does."""

    def __init__(self, dictionary, table):
        super().__init__(dictionary)
        self.log_table = torch.nn.Parameter(table.log(), requires_grad=False)
        self.calls = []

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
        self.calls.append(prev_output_tokens.size(1))
        return self.log_table[prev_output_tokens], {"attn": None}

    def reorder_incremental_state(self, incremental_state, new_order):
        pass


def bigram_model():
    d = Dictionary()
    a, b, c = (d.add_symbol(s) for s in "abc")
    V = len(d)
    table = torch.zeros(V, V, dtype=torch.float64)
    uniform = torch.zeros(V, dtype=torch.float64)
    uniform[[a, b, c]] = 1 / 3
    table[:] = uniform
    table[d.eos(), [a, b, c]] = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    table[a, [a, b, c, d.unk()]] = torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=torch.float64)
    table[c, [a, b, c, d.eos()]] = torch.tensor([0.2, 0.1, 0.6, 0.1], dtype=torch.float64)
    return FairseqLanguageModel(BigramDecoder(d, table)), d, (a, b, c), table


def test_generative_perplexity_scores_all_but_the_first_token():
    model, d, (a, b, c), _ = bigram_model()
    tokens = torch.tensor([[a, b, c], [c, c, a]])
    # the first token is context only: p(b|a) p(c|b) = 0.5 / 3;  p(c|c) p(a|c) = 0.6 * 0.2
    nll = ar_sequence_nll(model, tokens)
    assert nll.tolist() == pytest.approx([-math.log(0.5 / 3), -math.log(0.12)], rel=1e-6)
    g = generative_perplexity(model, tokens, batch_size=1)
    assert g["ppl"] == pytest.approx((0.5 / 3 * 0.12) ** -0.25, rel=1e-6)
    per_row = [-math.log(0.5 / 3) / 2, -math.log(0.12) / 2]
    se = abs(per_row[0] - per_row[1]) / 2          # sd of two values / sqrt(2)
    assert g["nll_se"] == pytest.approx(se, rel=1e-5)
    assert (g["sequences"], g["tokens"]) == (2, 4)
    # with a bos every token is scored after it: p(a|</s>) p(b|a) p(c|b)
    assert ar_sequence_nll(model, tokens[:1], d.eos()).item() == pytest.approx(
        -math.log(0.5 * 0.5 / 3), rel=1e-6)


def test_block_perplexity_reads_only_eos_before_each_block():
    model, d, (a, b, c), _ = bigram_model()
    stream = torch.tensor([a, b, c, c, a])
    # blocks [a b] [c c] [a]: each read after </s>, never after the previous block's last
    # token (p(c|b) = 1/3 would be read across the block boundary; p(c|</s>) = 0.25 is not)
    by_hand = (0.5 * 0.5) * (0.25 * 0.6) * 0.5
    r = ar_block_perplexity(model, stream, 2, d.eos(), batch_size=1)
    assert (r["tokens"], r["blocks"]) == (5, 3)
    assert r["nll"] == pytest.approx(-math.log(by_hand), rel=1e-6)
    assert r["ppl"] == pytest.approx(by_hand ** -0.2, rel=1e-6)


def test_ar_samples_follow_the_model_and_decode_incrementally():
    model, d, (a, b, c), table = bigram_model()
    n = 4000
    x = ar_samples(model, n, 3, d.eos(), seed=0, batch_size=n, forbid=(d.unk(),))
    assert x.shape == (n, 3)
    # incremental decoding: after the first step the decoder reads one new token per call
    assert model.decoder.calls == [1, 1, 1]
    assert not (x == d.unk()).any(), "a forbidden token was drawn"
    assert set(x.unique().tolist()) <= {a, b, c, d.eos()}
    # first tokens ~ p(.|</s>); the token after an `a` ~ p(.|a) renormalised without unk
    first = torch.bincount(x[:, 0], minlength=len(d)).double() / n
    assert first[[a, b, c]].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=0.03)
    after_a = x[:, 1][x[:, 0] == a]
    freq = torch.bincount(after_a, minlength=len(d)).double() / after_a.numel()
    assert freq[[a, b, c]].tolist() == pytest.approx([0.1 / 0.9, 0.5 / 0.9, 0.3 / 0.9], abs=0.04)
    # same seed, same samples
    assert torch.equal(x, ar_samples(model, n, 3, d.eos(), seed=0, batch_size=n,
                                     forbid=(d.unk(),)))


def test_compare_script_end_to_end(ptb_tiny, tmp_path):
    """Three models trained for the same tokens, evaluated, sampled and scored; the
    table has every column filled and the plots are written."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "examples" / "compare" / "compare.py"),
           "--data", str(ptb_tiny), "--zero-shot", str(ptb_tiny), "--work-dir", str(work),
           "--out", str(out), "--max-update", "4", "--validate-interval-updates", "2",
           "--batch-size", "8", "--tokens-per-sample", "32", "--layers", "1",
           "--embed-dim", "32", "--heads", "2", "--cond-dim", "16", "--warmup-updates", "2",
           "--samples", "4", "--steps", "4,16", "--eval-passes", "2", "--sample-batch", "4",
           "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    models = ("mdlm", "mdlm_ar", "transformer_lm")
    assert tuple(res["models"]) == models
    # same tokens seen; every model scored every test token, on both corpora
    assert {res["training"][m]["tokens_seen"] for m in models} == {4 * 8 * 32}
    for part in (res["test"], res["zero_shot"]["by_model"]):
        assert {part[m]["tokens"] for m in models} == {res["test_split_tokens"]}
        assert part["mdlm"]["bound"] and part["mdlm"]["ppl_se"] > 0
    for a in ("mdlm_ar", "transformer_lm"):
        assert res["ratios"][a] == pytest.approx(res["test"]["mdlm"]["ppl"] / res["test"][a]["ppl"])
        # the validation curve has a point per interval
        assert [u for u, _ in res["training"][a]["valid_curve"]] == [2, 4]
    rows = res["generation"]["rows"]
    assert [(r["source"], r["steps"]) for r in rows] == [
        ("test data", None), ("mdlm (ddpm_cache)", 4), ("mdlm (ddpm_cache)", 16),
        ("mdlm_ar", 32), ("transformer_lm", 32)]
    for r in rows:
        assert set(r["scored_by"]) == {"mdlm_ar", "transformer_lm"}
        assert all(math.isfinite(s["ppl"]) and s["ppl"] > 1 for s in r["scored_by"].values())
        assert 0 < r["entropy"] <= math.log(32)
    # every table cell filled: only the data row has no steps / seconds
    md = (out / "results.md").read_text()
    for line in md.splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert all(cells), line
            assert not any(c in ("None", "nan", "inf") for c in cells), line
            if not line.startswith("| test data"):
                assert "-" not in cells, line
    for png in ("valid_ppl.png", "gen_ppl.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the same command again reuses the finished training runs
    proc = subprocess.run(cmd + ["--models", "mdlm_ar"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "mdlm_ar: trained already" in proc.stdout, proc.stdout[-2000:]
