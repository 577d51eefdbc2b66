"""The comparison with the AR baselines: the generative-perplexity scorer and the AR
sampler on a bigram model whose answers are known by hand, and the one-command
comparison script end to end on a tiny budget."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel

from conftest import REPO
from mdlm_plugin.generative_eval import (ar_block_perplexity, ar_samples, ar_sequence_nll,
                                         generative_perplexity)
from mdlm_plugin.reporting import local_path


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
    """Every row (the AR baselines, block diffusion, SEDD, an ablation) trained for the
    same tokens, 2 seeds for MDLM and the block model and 1 for the others, evaluated,
    sampled by two samplers and scored: every cell a mean with its spread over seeds or
    marked as one seed, ratios paired by seed, the plots written, finished runs reused."""
    out, work = tmp_path / "out", tmp_path / "work"
    models = ("mdlm", "mdlm_ar", "transformer_lm", "mdlm_iid", "sedd", "bd3_8")
    two_seeds = ("mdlm", "bd3_8")
    cmd = [sys.executable, str(REPO / "examples" / "compare" / "compare.py"),
           "--data", str(ptb_tiny), "--work-dir", str(work),
           "--out", str(out), "--max-update", "2", "--validate-interval-updates", "1",
           "--batch-size", "8", "--tokens-per-sample", "32", "--layers", "1",
           "--embed-dim", "32", "--heads", "2", "--cond-dim", "16", "--warmup-updates", "2",
           "--samples", "2", "--steps", "2", "4", "--eval-passes", "2", "--sample-batch", "2",
           "--threads", "2", "--models", ",".join(models[:-1]), "--block-sizes", "8",
           "--seeds", "1", "2", "--samplers", "ddpm_cache", "first_hitting", "--seeds-for",
           *(f"{m}=1" for m in models if m not in two_seeds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert tuple(res["models"]) == models
    runs = res["runs"]
    for m in models:
        seeds = [1, 2] if m in two_seeds else [1]
        assert [r["training"]["seed"] for r in runs[m]] == seeds
        # seed 1 keeps the run directory of a single-seed comparison
        assert [os.path.basename(os.path.dirname(r["training"]["checkpoint"]))
                for r in runs[m]] == [m, f"{m}_seed2"][:len(seeds)]
        for r in runs[m]:
            assert r["training"]["tokens_seen"] == 2 * 8 * 32
            assert [u for u, _ in r["training"]["valid_curve"]] == [1, 2]
            # every test token scored, by both AR scorers
            for part in ("test", "test_eos_only"):
                assert part not in r or r[part]["tokens"] == res["test_split_tokens"]
    assert runs["mdlm"][0]["test"]["bound"] and runs["mdlm"][0]["test"]["ppl_se"] > 0
    for m, flags in (("mdlm_iid", "--time-sampling iid"), ("sedd", "--criterion sedd"),
                     ("bd3_8", "--max-positions 512 --block-size 8 --tokens-per-sample")):
        assert flags in " ".join(runs[m][0]["training"]["command"])
    assert all(r["test"]["bound"] for m in ("mdlm_iid", "sedd", "bd3_8") for r in runs[m])
    # the two seeds trained different models
    assert runs["mdlm"][0]["test"]["ppl"] != runs["mdlm"][1]["test"]["ppl"]
    for a in ("mdlm_ar", "transformer_lm"):
        # eval-lm reads the previous block's last token: a different value than </s> only
        assert all(r["test_eos_only"]["ppl"] != r["test"]["ppl"] for r in runs[a])
    check_samples(res["generation"]["rows"], two_seeds)
    md = (out / "results.md").read_text()
    check_cells(md)
    # a row's ratio to MDLM: paired by seed, mean ± sd over the pairs
    r = [a["test"]["ppl"] / b["test"]["ppl"] for a, b in zip(runs["bd3_8"], runs["mdlm"])]
    bd3 = [line for line in md.splitlines() if line.startswith("| bd3_8 |")][0]
    assert bd3.endswith(f"| {statistics.fmean(r):.3f} ± {statistics.stdev(r):.3f} |")
    assert "| transformer_lm | 1 * |" in md and "| sedd | 1 * |" in md   # fewer seeds
    # each diffusion row against MDLM: mean difference ± the larger seed sd, 2-sd verdict
    diff = [line for line in md.splitlines() if line.startswith("| bd3_8 | ")][1]
    d = statistics.fmean(r["test"]["ppl"] for r in runs["bd3_8"]) - statistics.fmean(
        r["test"]["ppl"] for r in runs["mdlm"])
    sd = max(statistics.stdev(r["test"]["ppl"] for r in runs[m]) for m in two_seeds)
    verdict = "yes" if abs(d) > 2 * sd else "not resolved"
    assert diff == f"| bd3_8 | {d:+.1f} ± {sd:.1f} | {verdict} ({abs(d) / sd:.1f} sd) |", diff
    assert any(line.startswith(("| sedd | +", "| sedd | -")) for line in md.splitlines())
    for png in ("valid_ppl.png", "gen_ppl.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    check_reuse_and_zero_shot(cmd, res, tmp_path / "out2", ptb_tiny)
    check_reuse_across_machines(cmd, res, out / "results.json", tmp_path)


def check_reuse_and_zero_shot(cmd, res, out2, data):
    """The same command again reuses finished runs (seed 2: its own directory), also one
    without compare.py's record (a run made by hand: its checkpoint is kept, not trained
    on); zero-shot scores every token of the other corpus, a bound for MDLM."""
    recorded = local_path(res["runs"]["mdlm"][1]["training"]["checkpoint"])
    os.remove(os.path.join(os.path.dirname(recorded), "train_done.json"))
    again = cmd[:cmd.index("--models")] + ["--models", "mdlm", "--seeds", "2",
                                           "--zero-shot", str(data), "--out", str(out2)]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mdlm seed 2: finished already" in proc.stdout
    run = json.loads((out2 / "results.json").read_text())["runs"]["mdlm"][0]
    assert run["zero_shot"]["tokens"] == res["test_split_tokens"] and run["zero_shot"]["bound"]
    assert run["test"]["ppl"] == res["runs"]["mdlm"][1]["test"]["ppl"]
    check_cells((out2 / "results.md").read_text())


def check_reuse_across_machines(cmd, res, old_json, tmp_path):
    """--reuse on a machine without the runs: seeds 1-2 of MDLM come from the earlier
    results.json (cells, samples and their scores unchanged), seed 3 is trained, and the
    AR judge is trained again from the same recipe and gives the same perplexity."""
    out3 = tmp_path / "out3"
    again = cmd[:cmd.index("--models")] + [
        "--models", "mdlm,mdlm_ar", "--seeds", "1", "2", "3", "--seeds-for", "mdlm_ar=1",
        "--samplers", "ddpm_cache", "--reuse", str(old_json),
        "--work-dir", str(tmp_path / "work3"), "--out", str(out3)]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    new = json.loads((out3 / "results.json").read_text())
    mdlm = new["runs"]["mdlm"]
    assert ["reused_from" in r for r in mdlm] == [True, True, False]
    assert [r["test"]["ppl"] for r in mdlm[:2]] == [r["test"]["ppl"] for r in res["runs"]["mdlm"]]
    assert os.path.isfile(local_path(mdlm[2]["training"]["checkpoint"]))
    judge, old_judge = new["runs"]["mdlm_ar"][0], res["runs"]["mdlm_ar"][0]
    assert "reused_from" not in judge
    assert os.path.isfile(local_path(judge["training"]["checkpoint"]))
    assert judge["test"]["ppl"] == pytest.approx(old_judge["test"]["ppl"], rel=1e-6)
    rows = {(r["source"], r["sampler"], r["steps"]): r for r in new["generation"]["rows"]}
    old_rows = {(r["source"], r["sampler"], r["steps"]): r for r in res["generation"]["rows"]}
    for steps in (2, 4):
        by_seed = rows[("mdlm", "ddpm_cache", steps)]["by_seed"]
        assert [x["seed"] for x in by_seed] == [1, 2, 3]
        assert by_seed[:2] == old_rows[("mdlm", "ddpm_cache", steps)]["by_seed"]
    md = (out3 / "results.md").read_text()
    assert "Taken from earlier comparisons" in md and "mdlm seed 1, mdlm seed 2." in md
    assert f"mdlm_ar seed 1 {judge['test']['ppl']:.2f} (recorded {old_judge['test']['ppl']:.2f})" in md
    check_cells(md)


def check_samples(rows, two_seeds):
    """Every sample set of every seed scored by both judges, with its diversity and cost."""
    diffusion = [(m, s, t) for m in ("mdlm", "sedd", "bd3_8")
                 for s in ("ddpm_cache", "first_hitting") for t in (2, 4)]
    assert sorted((r["source"], r["sampler"], r["steps"]) for r in rows[1:]) == sorted(
        diffusion + [("mdlm_ar", "ancestral", 32), ("transformer_lm", "ancestral", 32)])
    assert rows[0]["source"] == "test data"
    for r in rows[1:]:
        assert [x["seed"] for x in r["by_seed"]] == ([1, 2] if r["source"] in two_seeds else [1])
        for x in r["by_seed"]:
            assert set(x["gen_ppl"]) == {"mdlm_ar", "transformer_lm"}
            assert all(math.isfinite(p) and p > 1 for p in x["gen_ppl"].values())
            assert 0 < x["entropy"] <= math.log(32) and 0 <= x["repetition"] < 1
            # network calls actually made: at most the steps, per block of 8 for bd3_8,
            # which also runs each committed block once (all but the last); first_hitting:
            # exactly one per masked token whatever the steps
            blocks = 32 // 8 if r["source"] == "bd3_8" else 1
            if r["sampler"] == "first_hitting":
                assert x["calls_per_sample"] == 32 + blocks - 1
            else:
                limit = 32 if r["sampler"] == "ancestral" else blocks * r["steps"] + blocks - 1
                assert 0 < x["calls_per_sample"] <= limit


def check_cells(md):
    """Every table cell filled; every measured value of a trained row a mean ± spread
    over seeds, or marked as one seed."""
    for line in md.splitlines():
        if line.startswith("| ") and "---" not in line and not line.startswith(
                ("| model |", "| samples from")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert all(cells) and not any(c in ("None", "nan", "inf") for c in cells), line
            if not line.startswith("| test data"):
                for c in cells[1:]:
                    if c[-1:].isdigit() and "." in c:
                        assert " ± " in c or c.endswith("(1 seed)"), (c, line)


def test_noise_ab_report_reproduces_the_committed_results(tmp_path):
    """examples/compare/noise_ab.py --report-only: the committed A/B table re-renders byte
    for byte, and its group means are those of the runs' test bounds."""
    committed = REPO / "examples" / "compare" / "results" / "ptb_noise"
    (tmp_path / "results.json").write_text((committed / "results.json").read_text())
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "compare" / "noise_ab.py"),
                           "--report-only", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "results.md").read_text()
    assert md == (committed / "results.md").read_text()
    assert (tmp_path / "valid_curves.png").read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((committed / "results.json").read_text())["runs"]
    keyed = [r["test_ppl"] for r in runs if r["arm"] == "keyed"]
    assert f"test mean {statistics.fmean(keyed):.1f} ± {statistics.stdev(keyed):.1f} sd" in md


def single_seed_record():
    """A results.json as compare.py wrote it with one seed (``--seed``): per-model
    ``training`` / ``test`` / ``params`` / ``zero_shot.by_model``, generation rows
    ``scored_by`` each AR model, no ``runs``."""
    def evaluation(ppl, bound):
        return {"ppl": ppl, "ppl_se": 3.0 if bound else 0.0, "bits": math.log2(ppl),
                "bits_se": 0.01 if bound else 0.0, "bound": bound, "tokens": 1000,
                "command": ["fairseq-validate" if bound else "fairseq-eval-lm"]}

    def samples(source, steps, ppl, seconds, calls):
        return {"source": source, "steps": steps, "samples": 4, "entropy": 2.5,
                "seconds": seconds, "network_calls": calls,
                "scored_by": {"mdlm_ar": {"ppl": ppl, "ppl_se": ppl / 20}}}
    training = {m: {"model": m, "command": ["fairseq-train", "data-bin/sotu", "--seed", "3"],
                    "checkpoint": f"checkpoints/compare_sotu/{m}/checkpoint_last.pt",
                    "tokens_seen": 4096, "valid_curve": [[1, 900.0 + k], [2, 500.0 + k]],
                    "train_wps_median": 1000.0, "resumed": False, "wall_s": 90.0,
                    "cpu_s": 60.0, "tokens_per_cpu_s": 4096 / 60}
                for k, m in enumerate(("mdlm", "mdlm_ar"))}
    zero_shot = {"mdlm": {**evaluation(240.0, True), "word_ppl": 2400.0},
                 "mdlm_ar": {**evaluation(80.0, False), "word_ppl": 800.0}}
    return {
        "corpus": "sotu", "command": "python examples/compare/compare.py --corpus sotu",
        "machine": "a CPU", "date": "2026-01-01", "git": "abc1234",
        "models": ["mdlm", "mdlm_ar"], "training": training,
        "args": {"corpus": "sotu", "data": "data-bin/sotu", "zero_shot": "data-bin/sotu/ptb-test",
                 "models": ["mdlm", "mdlm_ar"], "max_update": 2, "batch_size": 16,
                 "tokens_per_sample": 128, "layers": 1, "embed_dim": 32, "heads": 2,
                 "cond_dim": 16, "dropout": 0.1, "lr": 0.001, "warmup_updates": 1,
                 "validate_interval_updates": 1, "seed": 3, "threads": 1,
                 "extra_train_args": "", "eval_passes": 4, "samples": 4, "steps": [8, 32],
                 "sampler": "ddpm_cache", "sample_batch": 2, "report_only": False},
        "tokens_per_update": 2048,
        "test": {"mdlm": evaluation(120.0, True), "mdlm_ar": evaluation(60.0, False)},
        "test_split_tokens": 1000, "ratios": {"mdlm_ar": 2.0},
        "zero_shot": {"data": "data-bin/sotu/ptb-test", "by_model": zero_shot,
                      "word_tokens": 100, "ratios": {"mdlm_ar": 3.0}},
        "params": {"mdlm": 1_000_000, "mdlm_ar": 990_000},
        "generation": {"rows": [samples("test data", None, 50.0, None, None),
                                samples("mdlm (ddpm_cache)", 8, 700.0, 4.0, 8),
                                samples("mdlm (ddpm_cache)", 32, 400.0, 8.0, 40),
                                samples("mdlm_ar", 128, 45.0, 1.0, 256)],
                       "scorers": ["mdlm_ar"], "length": 128,
                       "examples": {"mdlm (ddpm_cache) 8": "a b", "mdlm (ddpm_cache) 32": "c d",
                                    "mdlm_ar 128": "e f"}}}


def test_a_single_seed_record_renders_as_runs_of_its_seed(tmp_path):
    """compare.py --report-only on a results.json without ``runs``: every number of the
    record in the current tables and plots as one seed (its own), what it did not measure
    as `-`, its sample measures described; results.json itself left as it is."""
    record = json.dumps(single_seed_record(), indent=1)
    (tmp_path / "results.json").write_text(record)
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "compare" / "compare.py"),
                           "--corpus", "sotu", "--report-only", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results.json").read_text() == record
    md = (tmp_path / "results.md").read_text()
    check_cells(md)
    assert "Seeds: 3 " in md
    lines = set(md.splitlines())
    for line in (
            # test: the bound and the AR row by eval-lm; their ratio (2.0) where it is
            "| mdlm | 1 | 1.00M | <= 120.00 (1 seed) | 3.00 (1 seed) | 1,000 | 1.000 (1 seed) |",
            "| mdlm_ar | 1 | 0.99M | 60.00 (1 seed) | exact | 1,000 | 0.500 (1 seed) |",
            "| mdlm_ar | 60.00 (1 seed) | - | - | 1,000 | 2.000 (1 seed) | - |",
            "| mdlm | 1 | <= 240.00 (1 seed) | <= 2400.00 (1 seed) | 1,000 | 1.000 (1 seed) |",
            # samples: calls per batch (40 over 2 batches), seconds per sample (8.0 / 4)
            "| mdlm | ddpm_cache | 32 | 20 (1 seed) | 400.0 (1 seed) (SE 20.0) "
            "| 2.500 (1 seed) | - | 2.00 (1 seed) |",
            "| mdlm_ar | ancestral | 128 | 128 (1 seed) | 45.0 (1 seed) (SE 2.2) "
            "| 2.500 (1 seed) | - | 0.25 (1 seed) |",
            "| test data | - | - | - | 50.0 (SE 2.5) | 2.500 | - | - |",
            # training: wall minutes from the recorded seconds, the last validation
            "| mdlm | 1 | 1,000 (1 seed) | 68 (1 seed) | 1.5 (1 seed) | 500.0 (1 seed) |",
            "- mdlm ddpm_cache 32: `c d`"):
        assert line in lines, line
    assert "the </s>-only score was not measured" in md
    assert "network calls per batch of 2 samples" in md
    for png in ("valid_ppl.png", "gen_ppl.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["ptb", "ptb_samplers", "sotu"])
def test_the_committed_comparisons_re_render_as_committed(name, tmp_path):
    """compare.py --report-only on each committed comparison writes its results.md byte
    for byte: the report code still reads every record it ever wrote."""
    committed = REPO / "examples" / "compare" / "results" / name
    (tmp_path / "results.json").write_text((committed / "results.json").read_text())
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "compare" / "compare.py"),
                           "--corpus", name.split("_")[0], "--report-only", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
