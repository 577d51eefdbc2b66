"""Sampling through fairseq-generate / fairseq-interactive (mdlm_plugin/generator.py).

Three layers: the positional scores against a denoiser whose drawn tokens reveal
the network call they came from; the task's generation hooks in-process on the
tiny trained checkpoint (exact token checks); the CLIs end to end, bad input
included.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import USER_DIR
from mdlm_plugin.diffusion.schedules import build_schedule
from mdlm_plugin.errors import MDLMUserError
from mdlm_plugin.generator import MaskedDiffusionGenerator

# ------------------------------------------------------------------ positional scores

V = 140          # tokens: 0..3 specials, 10+m / 100+m the two candidates, 139 <mask>
MASK = V - 1
W = 24           # window


def p_first(i):
    """Probability of the first candidate at window position i."""
    return 1.0 / (1.0 + math.exp(-(0.37 * i - 2.0)))


class Revealing(torch.nn.Module):
    """At a masked position i of a row with m masks, two candidates: 10 + m with
    probability p_first(i), 100 + m otherwise. The token drawn tells which call
    (how many masks) and which window position it came from, so its score can be
    checked without knowing the sampler's internals."""

    time_conditioning = False

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def sampling_denoiser(self, exclude=()):
        def run(z, sigma, positions):
            self.calls += 1
            m = (z == MASK).sum(-1, keepdim=True).expand_as(z)[positions]
            i = positions.nonzero()[:, 1].double()
            p = 1.0 / (1.0 + torch.exp(-(0.37 * i - 2.0)))
            logits = torch.full((m.numel(), V), float("-inf"), dtype=torch.float64)
            rows = torch.arange(m.numel())
            logits[rows, 10 + m] = p.log()
            logits[rows, 100 + m] = (1 - p).log()
            logits[:, list(exclude)] = float("-inf")
            return logits.float()
        return run


class Specials:
    def pad(self):
        return 1

    def eos(self):
        return 2


def expected_score(token, i):
    assert 10 < token < 100 + W + 1 and token not in range(10 + W + 1, 101), token
    return math.log(p_first(i) if token < 100 else 1 - p_first(i))


def make_generator(**kw):
    args = dict(sampler="ddpm_cache", steps=6, gen_length=W, window=W, seed=5)
    args.update(kw)
    return MaskedDiffusionGenerator(Revealing(), build_schedule("loglinear"), Specials(),
                                    MASK, **args)


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "analytic"])
def test_scores_are_the_log_prob_at_unmasking_one_window(sampler):
    gen = make_generator(sampler=sampler, nbest=3, retain_history=True)
    prompts = [torch.tensor([50, 51, 52]), torch.tensor([], dtype=torch.long),
               torch.tensor([60, MASK, MASK, 61, MASK, 62])]
    hypos = gen.generate_from_prompts(prompts)
    assert [len(h) for h in hypos] == [3, 3, 3]
    for prompt, hs in zip(prompts, hypos):
        for h in hs:
            toks, ps = h["tokens"], h["positional_scores"]
            template = bool((prompt == MASK).any())
            assert toks.numel() == (prompt.numel() if template else W)
            assert not bool((toks == MASK).any())
            for i in range(toks.numel()):
                given = i < prompt.numel() and prompt[i] != MASK
                if given:
                    assert toks[i] == prompt[i] and ps[i] == 0.0
                else:
                    assert ps[i] == pytest.approx(expected_score(int(toks[i]), i), abs=1e-5)
            filled = ps[ps != 0]
            assert h["score"] == pytest.approx(float(filled.mean()), abs=1e-6)
            assert h["steps"] == 6 and h["alignment"] is None
            hist = [x["tokens"] for x in h["history"]]
            assert len(hist) in (7, 8) and torch.equal(hist[-1], toks)
            start = prompt if template else torch.cat(
                [prompt, torch.full((W - prompt.numel(),), MASK)])
            assert torch.equal(hist[0], start)
    assert gen.stats.samples == 9 and gen.stats.network_calls == gen.model.calls


def window_position(o, prompt_len, stride):
    """Window-relative position of output index o under semi-AR layout."""
    keep = W - stride
    if prompt_len < W and o < W:
        return o
    base = W if prompt_len < W else prompt_len
    return keep + (o - base) % stride


@pytest.mark.parametrize("stride,prompt_len,steps", [
    (1, 0, 3), (5, 2, 4), (W // 2, 7, 5), (W // 2 + 5, 0, 2), (W, 3, 4), (7, W + 3, 3)])
def test_scores_follow_the_semi_ar_windows(stride, prompt_len, steps):
    total = 3 * W + 5
    gen = make_generator(gen_length=total, semi_ar_stride=stride, steps=steps, nbest=2)
    prompt = torch.arange(prompt_len) % 5 + 40
    (hs,) = gen.generate_from_prompts([prompt])
    for h in hs:
        toks, ps = h["tokens"], h["positional_scores"]
        assert toks.numel() == total and torch.equal(toks[:prompt_len], prompt)
        assert bool((ps[:prompt_len] == 0).all())
        for o in range(prompt_len, total):
            i = window_position(o, prompt_len, stride)
            assert ps[o] == pytest.approx(expected_score(int(toks[o]), i), abs=1e-5), o
    # the scores come from the sampler's own calls: no call is made to score
    assert gen.stats.network_calls == gen.model.calls


def test_generator_rejects_bad_settings():
    for kw, msg in [(dict(steps=0), "--steps: steps must be a positive integer"),
                    (dict(top_p=1.5), "--sampling-topp: top_p must be in (0, 1]"),
                    (dict(temperature=0.0), "--temperature"),
                    (dict(sampler="euler"), "--sampler: unknown sampler 'euler'"),
                    (dict(semi_ar_stride=W + 1), "--semi-ar-stride must be in [1, window=24]"),
                    (dict(gen_length=2 * W, retain_history=True), "--retain-iter-history"),
                    (dict(nbest=0), "--nbest must be >= 1")]:
        with pytest.raises(MDLMUserError, match=re.escape(msg)):
            make_generator(**kw)
    model = Revealing()
    model.time_conditioning = True
    for sampler in ("ddpm_cache", "first_hitting"):
        with pytest.raises(MDLMUserError, match=f"--sampler: sampler '{sampler}' needs a model "
                                                f"without time conditioning"):
            MaskedDiffusionGenerator(model, build_schedule("loglinear"), Specials(), MASK,
                                     sampler=sampler, gen_length=W, window=W)
    for kw, msg in [(dict(sampler="remdm", remdm_eta=-1.0), "--remdm-eta: the ReMDM eta must be >= 0"),
                    (dict(sampler="remdm", remdm_t_off=0.6), "--remdm-t-off: the ReMDM t_off"),
                    (dict(sampler="remdm", remdm_strategy="max"), "--remdm-strategy: unknown"),
                    (dict(sampler="confidence", commit_schedule="exp"), "--commit-schedule: unknown")]:
        with pytest.raises(MDLMUserError, match=re.escape(msg)):
            make_generator(**kw)
    gen = make_generator(sampler="confidence", steps=2, commit_per_step=3)
    with pytest.raises(MDLMUserError, match=re.escape("--commit-per-step: the commit schedule "
                                                      "does not finish")):
        gen.generate_from_prompts([torch.tensor([40])])
    gen = make_generator(gen_length=10)
    with pytest.raises(MDLMUserError, match="a prompt has 11 tokens, more than the requested"):
        gen.generate_from_prompts([torch.arange(11) + 40])
    with pytest.raises(MDLMUserError, match="a template must fit one window"):
        gen.generate_from_prompts([torch.full((W + 1,), MASK)])


# ------------------------------------------------------------------ task hooks, in-process

@pytest.fixture(scope="module")
def loaded(ptb_tiny, trained_tiny):
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    def load(*extra):
        parser = options.get_generation_parser()
        args = options.parse_args_and_arch(parser, [
            str(ptb_tiny), "--user-dir", USER_DIR, "--task", "masked_diffusion",
            "--path", str(trained_tiny[0] / "checkpoint_best.pt"), "--cpu",
            "--tokens-per-sample", "32", *extra])
        cfg = convert_namespace_to_omegaconf(args)
        task = tasks.setup_task(cfg.task)
        models, _ = checkpoint_utils.load_model_ensemble(
            [cfg.common_eval.path], task=task)
        return task, models, cfg
    return load


def test_prefix_tokens_are_kept(loaded):
    task, models, cfg = loaded("--steps", "8", "--nbest", "2", "--gen-length", "20")
    gen = task.build_generator(models, cfg.generation)
    task.load_dataset("test")
    ds = task.dataset("test")
    batch = ds.collater([ds[i] for i in range(6)])
    prefix = batch["target"][:, :5]
    hypos = task.inference_step(gen, models, batch, prefix_tokens=prefix)
    assert len(hypos) == 6
    for row, hs in zip(prefix, hypos):
        assert len(hs) == 2
        for h in hs:
            assert h["tokens"].numel() == 20
            assert torch.equal(h["tokens"][:5], row)
            assert not bool((h["tokens"] == task.mask_index).any())
            assert not bool((h["tokens"] == task.source_dictionary.pad()).any())
            assert bool((h["positional_scores"][:5] == 0).all())
            assert bool((h["positional_scores"][5:] < 0).all())
    # unconditional (--prefix-size 0): one sample of --gen-length per input
    hypos = task.inference_step(gen, models, batch)
    assert [h[0]["tokens"].numel() for h in hypos] == [20] * 6


def _inference_batch(task, lines):
    tokens, lengths = task.get_interactive_tokens_and_lengths(lines, lambda x: x)
    ds = task.build_dataset_for_inference(tokens, lengths)
    return tokens, ds.collater([ds[i] for i in range(len(lines))])


def test_interactive_inputs_prompts_and_infilling(loaded):
    task, models, cfg = loaded("--steps", "6", "--gen-length", "12", "--seed", "4")
    gen = task.build_generator(models, cfg.generation)
    d = task.source_dictionary
    lines = ["the company said", "", "the <mask> said it <mask>*3 in the market",
             "<mask>*2 new york"]
    tokens, batch = _inference_batch(task, lines)
    assert tokens[0].tolist() == [d.index(w) for w in "the company said".split()]
    assert tokens[1].numel() == 0
    assert (tokens[2] == task.mask_index).sum() == 4 and tokens[2].numel() == 10
    assert tokens[3][:2].tolist() == [task.mask_index] * 2
    hypos = task.inference_step(gen, models, batch)
    for given, (h,) in zip(tokens, hypos):
        toks = h["tokens"]
        template = bool((given == task.mask_index).any())
        assert toks.numel() == (given.numel() if template else 12)
        keep = given != task.mask_index
        assert torch.equal(toks[:given.numel()][keep], given[keep])
        assert not bool((toks == task.mask_index).any())


def test_semi_ar_reaches_the_requested_length(loaded):
    task, models, cfg = loaded("--steps", "4", "--gen-length", "75", "--semi-ar-stride", "9")
    gen = task.build_generator(models, cfg.generation)
    assert gen.semi_ar and gen.window == 32 and gen.stride == 9
    tokens, batch = _inference_batch(task, ["the company said", "<mask> of the <mask>"])
    hypos = task.inference_step(gen, models, batch)
    assert hypos[0][0]["tokens"].numel() == 75
    assert torch.equal(hypos[0][0]["tokens"][:3], tokens[0])
    assert hypos[1][0]["tokens"].numel() == 4        # a template keeps its length
    assert bool((hypos[0][0]["positional_scores"][3:] < 0).all())


def test_semi_ar_scores_on_the_real_model(loaded):
    """One step per window: every token comes from the window's first call, whose
    input is the last `keep` tokens plus masks; score it independently."""
    task, models, cfg = loaded("--steps", "1", "--gen-length", "60", "--semi-ar-stride", "20")
    gen = task.build_generator(models, cfg.generation)
    (h,) = gen.generate_from_prompts([torch.tensor([5, 6])])[0]
    toks, ps = h["tokens"], h["positional_scores"]
    model, mask, keep = models[0], task.mask_index, 32 - 20
    from mdlm_plugin.diffusion.objective import log_probs_without_mask
    windows, new = [(0, 2)], 32          # (window start, first new token) in the output
    while new < 60:
        windows.append((new - keep, new))
        new += 20
    checked = 0
    with torch.no_grad():
        for lo, new in windows:
            z = torch.full((1, 32), mask)
            z[0, :new - lo] = toks[lo:new]
            logits = model(z, sigma=torch.zeros(1), positions=z == mask)
            logits[:, task.source_dictionary.pad()] = float("-inf")
            n = min(32 - (new - lo), 60 - new)
            got = toks[new:new + n]
            want = log_probs_without_mask(logits, mask)[:n].gather(-1, got.unsqueeze(-1))
            assert torch.allclose(ps[new:new + n], want.squeeze(-1), atol=1e-4)
            checked += n
    assert checked == 58


# ------------------------------------------------------------------ the CLIs

def cli(tool, *args, stdin=None):
    """fairseq CLI as users run it (one thread: the tiny model is latency-bound)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True), stdin


def finish(started, timeout=300):
    proc, stdin = started
    out, err = proc.communicate(stdin, timeout=timeout)
    return proc.returncode, out + err


def run_all(*started):
    """Start CLIs together (2 cores, mostly start-up time), collect them in order."""
    return [finish(s) for s in started]


def _lines(text, tag):
    out = {}
    for line in text.splitlines():
        m = re.match(rf"{tag}-(\d+)\t(.*)$", line)
        if m:
            out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out


def _common(ptb_tiny, trained_tiny):
    return [ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion", "--path",
            trained_tiny[0] / "checkpoint_best.pt", "--cpu", "--tokens-per-sample", "32"]


def test_fairseq_generate(ptb_tiny, trained_tiny, tmp_path):
    common = [*_common(ptb_tiny, trained_tiny), "--gen-subset", "test", "--batch-size", "16",
              "--steps", "8"]
    prompted = [*common, "--sample-break-mode", "eos", "--prefix-size", "4", "--nbest", "2",
                "--scoring", "sacrebleu", "--seed", "3"]
    (rc1, out1), (rc2, out2), (rc3, out3) = run_all(
        cli("generate", *prompted),
        cli("generate", *prompted, "--results-path", tmp_path / "res"),
        cli("generate", *common, "--seed", "4", "--retain-iter-history", "--print-step",
            "--post-process", "sentencepiece", "--sampler", "ddpm"))
    assert rc1 == 0 and rc2 == 0 and rc3 == 0, (out1 + out2 + out3)[-3000:]

    hyps, targets, pos = _lines(out1, "H"), _lines(out1, "T"), _lines(out1, "P")
    assert len(hyps) == len(targets) > 100 and all(len(h) == 2 for h in hyps.values())
    for i, hs in hyps.items():
        ref = targets[i][0].replace("<<unk>>", "<unk>").split()
        for h, p in zip(hs, pos[i]):
            score, text = h.split("\t")
            assert "<mask>" not in text and "<pad>" not in text
            scores = [float(x) for x in p.split()]
            given = min(4, len(ref) + 1)   # the target's tokens: its words and </s>
            assert len(scores) == 32 and scores[:given] == [0.0] * given
            assert all(x < 0 for x in scores[given:])
            assert float(score) == pytest.approx(sum(scores) / (32 - given), abs=1e-3)
            if len(ref) >= 4:              # no </s> among the 4 given tokens
                assert text.split()[:4] == ref[:4]
    assert re.search(r"Generate test with beam=5: BLEU = [\d.]+", out1)
    stats = re.search(r"mdlm sampling: (\d+) samples, (\d+) tokens filled, (\d+) network "
                      r"calls .* tokens/s, mean unigram entropy ([\d.]+) nats", out1)
    n = 2 * len(hyps)
    assert stats and int(stats.group(1)) == n and 28 * n <= int(stats.group(2)) < 32 * n
    assert 0 < int(stats.group(3)) <= 9 * math.ceil(len(hyps) / 16) and float(stats.group(4)) > 0

    # the same seed gives the same samples (the second run wrote them to --results-path)
    saved = (tmp_path / "res" / "generate-test.txt").read_text()
    assert _lines(saved, "H") == hyps and _lines(saved, "P") == pos

    # unconditional, another seed, the denoising trajectory
    hyps3, hist = _lines(out3, "H"), _lines(out3, "I")
    assert len(hyps3) == len(_lines(out3, "T")) > 50 and len(hist) == len(hyps3)
    assert all(v == ["8"] for v in hist.values())
    assert all(" " not in h.split("\t")[1] for hs in hyps3.values() for h in hs)  # sentencepiece
    traj = [line for line in out3.splitlines() if line.startswith("E-7_")]
    assert len(traj) in (9, 10)
    assert traj[0].split("\t")[1] == " ".join(["<mask>"] * 32) and "<mask>" not in traj[-1]


def test_fairseq_interactive(ptb_tiny, trained_tiny):
    common = _common(ptb_tiny, trained_tiny)
    lines = "the company said\n\nthe <mask> said it <mask>*3 in the market\nnew york <mask>*4\n"
    (rc, out), (rc_ar, out_ar) = run_all(
        cli("interactive", *common, "--steps", "8", "--nbest", "2", "--gen-length", "12",
            "--batch-size", "2", "--buffer-size", "4", stdin=lines),
        cli("interactive", *common, "--steps", "4", "--gen-length", "80", stdin=lines))
    assert rc == 0 and rc_ar == 0, (out + out_ar)[-3000:]
    hyps, pos = _lines(out, "H"), _lines(out, "P")
    assert sorted(hyps) == [0, 1, 2, 3] and all(len(h) == 2 for h in hyps.values())
    for h in hyps[0]:
        assert h.split("\t")[1].startswith("the company said")
    patterns = {2: r"the( \S+)? said it( \S+){0,3} in the market", 3: r"new york( \S+){0,4}"}
    for i, pattern in patterns.items():
        for h in hyps[i]:
            assert re.fullmatch(pattern, h.split("\t")[1]), h
    lengths = {i: [len(p.split()) for p in ps] for i, ps in pos.items()}
    assert lengths == {0: [12, 12], 1: [12, 12], 2: [10, 10], 3: [6, 6]}
    assert "<mask>" not in "".join(h for hs in hyps.values() for h in hs)
    assert "mdlm sampling: 8 samples" in out

    # semi-autoregressive past the 32-token window; templates keep their length
    pos_ar = _lines(out_ar, "P")
    assert [len(pos_ar[i][0].split()) for i in range(4)] == [80, 80, 10, 6]
    assert "semi-autoregressive sampling: 80 tokens in windows of 32, 16 new" in out_ar


def test_bad_input_gives_one_clear_error(ptb_tiny, trained_tiny):
    common = _common(ptb_tiny, trained_tiny)
    gen = [*common, "--gen-subset", "test", "--batch-size", "16"]
    cases = [
        (cli("generate", *gen, "--steps", "0"),
         "mdlm_plugin: error: --steps: steps must be a positive integer, got 0"),
        (cli("generate", *gen, "--sampling-topp", "1.5"),
         "mdlm_plugin: error: --sampling-topp: top_p must be in (0, 1], got 1.5"),
        (cli("generate", *gen, "--sampler", "euler"),
         "argument --sampler: invalid choice: 'euler' (choose from 'ddpm', 'ddpm_cache', "
         "'analytic', 'first_hitting', 'remdm', 'confidence')"),
        (cli("generate", *gen, "--model-overrides", "{'time_conditioning': True}"),
         "mdlm_plugin: error: --sampler: sampler 'ddpm_cache' needs a model without time "
         "conditioning"),
        (cli("generate", *gen, "--sampler", "remdm", "--remdm-t-on", "0.2", "--remdm-t-off", "0.4"),
         "mdlm_plugin: error: --remdm-t-off: the ReMDM t_off must be in [0, t_on = 0.2)"),
        (cli("generate", *gen, "--prefix-size", "5", "--gen-length", "3"),
         "mdlm_plugin: error: a prompt has 5 tokens, more than the requested length "
         "--gen-length 3"),
        (cli("interactive", *common, "--gen-length", "3", stdin="the company said that\n"),
         "mdlm_plugin: error: a prompt has 4 tokens, more than the requested length"),
    ]
    for started, message in cases:
        rc, text = finish(started)
        assert rc != 0, text[-2000:]
        assert "Traceback" not in text, text[-3000:]
        assert message in text, text[-2000:]


@pytest.mark.parametrize("sampler,extra", [
    ("first_hitting", []), ("remdm", ["--remdm-eta", "0.2", "--remdm-strategy", "rescale"]),
    ("confidence", ["--commit-schedule", "linear", "--confidence-noise", "0.5"])])
def test_new_samplers_through_the_clis(ptb_tiny, trained_tiny, sampler, extra):
    """fairseq-generate with prompts and fairseq-interactive with a prompt and an
    infilling template, for each new sampler."""
    common = [*_common(ptb_tiny, trained_tiny), "--sampler", sampler, "--steps", "12", *extra]
    lines = "the company said\nthe <mask> said it <mask>*3 in the market\n"
    (rc_g, out_g), (rc_i, out_i) = run_all(
        cli("generate", *common, "--gen-subset", "test", "--batch-size", "16",
            "--prefix-size", "3", "--seed", "5"),
        cli("interactive", *common, "--gen-length", "16", stdin=lines))
    assert rc_g == 0 and rc_i == 0, (out_g + out_i)[-3000:]
    hyps, pos = _lines(out_g, "H"), _lines(out_g, "P")
    assert len(hyps) > 50
    for i, (p,) in pos.items():
        scores = [float(v) for v in p.split()]
        assert len(scores) == 32 and scores[:3] == [0.0] * 3 and all(v < 0 for v in scores[3:])
    stats = re.search(r"(\d+) network calls \((\d+) row evaluations\).*mean unigram entropy "
                      r"([\d.]+) nats, repeated 4-grams ([\d.]+)%", out_g)
    assert stats and float(stats.group(3)) > 0 and 0 <= float(stats.group(4)) <= 100
    if sampler == "first_hitting":             # one row evaluation per filled token
        assert int(stats.group(2)) == 29 * len(hyps)
    hyps_i = _lines(out_i, "H")
    assert hyps_i[0][0].split("\t")[1].startswith("the company said")
    assert re.fullmatch(r"the( \S+)? said it( \S+){0,3} in the market", hyps_i[1][0].split("\t")[1])
    assert "<mask>" not in "".join(h for hs in (*hyps.values(), *hyps_i.values()) for h in hs)


def test_window_comes_from_the_checkpoint(ptb_tiny, trained_tiny):
    """Without --tokens-per-sample the CLIs sample the checkpoint's 32-token window (the
    default, 1024, would exceed the tiny model's positions); a given one still wins."""
    common = [ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion", "--path",
              trained_tiny[0] / "checkpoint_best.pt", "--cpu", "--steps", "4"]
    (rc_g, out_g), (rc_i, out_i), (rc_w, out_w) = run_all(
        cli("generate", *common, "--gen-subset", "test", "--batch-size", "32"),
        cli("interactive", *common, stdin="the company said\n"),
        cli("interactive", *common, "--tokens-per-sample", "20", stdin="the company said\n"))
    assert rc_g == 0 and rc_i == 0 and rc_w == 0, (out_g + out_i + out_w)[-3000:]
    assert "--tokens-per-sample 32, from the checkpoint" in out_g
    pos = _lines(out_g, "P")
    assert len(pos) > 50 and all(len(p[0].split()) == 32 for p in pos.values())
    assert len(_lines(out_i, "P")[0][0].split()) == 32
    assert len(_lines(out_w, "P")[0][0].split()) == 20
