"""Conditional masked diffusion (translation): the core on oracles, then a copy task
through fairseq-train, fairseq-validate and fairseq-generate --scoring sacrebleu."""
import math
import os
import random
import re
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from mdlm_plugin.diffusion.conditional import (ConditionalInputError, canvas_of, join,
                                               read_canvas, training_input)
from mdlm_plugin.diffusion.objective import nelbo
from mdlm_plugin.diffusion.samplers import SAMPLERS, SamplerConfig, sample
from mdlm_plugin.diffusion.schedules import build_schedule
from mdlm_plugin.errors import MDLMUserError

from conftest import USER_DIR, fairseq_cli, preprocess, write_copy

# symbols 0..5 are text, then </s>, <mask>, <pad>
V, EOS, MASK, PAD = 6, 6, 7, 8
N_SYMBOLS = 9
CANVAS = 6


def rows(*lists):
    return [torch.tensor(r) for r in lists]


def test_canvas_and_join_layout():
    x, not_scored = training_input(rows([1, 2, EOS], [3, EOS]), rows([4, EOS], [5, 1, 2, EOS]),
                                   CANVAS, EOS, PAD)
    assert x.tolist() == [[4, EOS, EOS, EOS, EOS, EOS, 1, 2, EOS],
                          [5, 1, 2, EOS, EOS, EOS, 3, EOS, PAD]]
    assert not_scored.tolist() == [[False] * 6 + [True] * 3,
                                   [False] * 6 + [True] * 3]
    with pytest.raises(ConditionalInputError, match="more than the canvas of 6"):
        canvas_of(torch.tensor([1] * 6 + [EOS]), CANVAS, EOS)
    with pytest.raises(ConditionalInputError, match="must end with </s>"):
        canvas_of(torch.tensor([1, 2]), CANVAS, EOS)
    with pytest.raises(ConditionalInputError, match="need 9 positions; the model has 8"):
        join(rows([1, 2, EOS]), [torch.full((CANVAS,), MASK)], PAD, max_positions=8)
    assert read_canvas(torch.tensor([4, 2, EOS, EOS, 1, EOS]), 4, EOS) == 3
    assert read_canvas(torch.tensor([4, 2, 3, 3, 1, EOS]), 4, EOS) == 4


def conditional_oracle(z_t, sigma, positions, recorded=None):
    """Target positions independent given the source: canvas position j of a row is
    token (s_0 + j) mod V w.p. 0.7, else uniform over the other text symbols and </s>
    (s_0: the row's first source token, at position CANVAS). Fails if it is masked."""
    if recorded is not None:
        recorded.append(z_t.clone())
    s0 = z_t[:, CANVAS]
    assert not bool((s0 == MASK).any()), "the source was masked"
    logits = torch.full(z_t.shape + (N_SYMBOLS,), -1e4)
    logits[..., :V + 1] = math.log(0.3 / V)
    likely = (s0.unsqueeze(1) + torch.arange(z_t.size(1))) % V
    logits.scatter_(-1, likely.unsqueeze(-1), math.log(0.7))
    logits[..., MASK] = 3.0                      # SUBS removes it
    return logits[positions]


def oracle_log_prob(x):
    """log p(canvas | source) under the oracle, per row."""
    likely = (x[:, CANVAS:CANVAS + 1] + torch.arange(CANVAS)) % V
    hit = x[:, :CANVAS] == likely
    return torch.where(hit, math.log(0.7), math.log(0.3 / V)).sum(1)


def random_pairs(n, seed):
    r = random.Random(seed)
    sources = [torch.tensor([r.randrange(V) for _ in range(r.randint(1, 4))] + [EOS])
               for _ in range(n)]
    targets = [torch.tensor([r.randrange(V) for _ in range(r.randint(0, CANVAS - 1))] + [EOS])
               for _ in range(n)]
    return sources, targets


def test_bound_is_exact_for_an_independent_conditional_oracle():
    """E[NELBO] = -log p(canvas | source) when canvas positions are independent given
    the source; the source is never masked, padding never scored."""
    sources, targets = random_pairs(64, 0)
    x, not_scored = training_input(sources, targets, CANVAS, EOS, PAD)
    exact = -oracle_log_prob(x)
    schedule = build_schedule("loglinear")
    g = torch.Generator().manual_seed(1)
    seen = []
    draws = torch.stack([nelbo(lambda z, s, p: conditional_oracle(z, s, p, seen), x, schedule,
                               MASK, not_scored, generator=g).per_sequence for _ in range(300)])
    for z in seen:
        assert torch.equal(z[not_scored], x[not_scored])      # source and padding as given
    assert bool((torch.cat(seen) == MASK).any())
    est, se = draws.mean(0).sum(), draws.sum(1).std() / math.sqrt(len(draws))
    assert abs(est - exact.sum()) < 4 * se + 2e-3 * exact.sum(), (est, exact.sum(), se)
    terms = nelbo(conditional_oracle, x, schedule, MASK, not_scored, generator=g)
    assert terms.n_tokens == 64 * CANVAS


def copy_oracle(z_t, sigma, positions):
    """Canvas = the source (</s> included), then </s>; sharp but not one-hot."""
    source = torch.cat([z_t[:, CANVAS:], z_t.new_full((z_t.size(0), CANVAS), PAD)], 1)
    want = source[:, :CANVAS].clone()
    after = torch.cumsum((want == EOS) | (want == PAD), 1) - ((want == EOS) | (want == PAD)).long()
    want[after > 0] = EOS                        # past the source's </s>: filler
    logits = torch.zeros(z_t.shape + (N_SYMBOLS,))
    logits[:, :CANVAS].scatter_(-1, want.unsqueeze(-1), 12.0)
    logits[..., MASK] = 20.0
    return logits[positions]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_translates_and_keeps_the_source(sampler):
    sources = rows([1, 2, 3, EOS], [4, EOS], [5, 5, 0, 1, 2, EOS])
    z = join(sources, [torch.full((CANVAS,), MASK)] * 3, PAD)[0]
    out = sample(copy_oracle, z, SamplerConfig(sampler=sampler, steps=8, temperature=0.05),
                 build_schedule("loglinear"), MASK, generator=torch.Generator().manual_seed(0))
    given = z != MASK
    assert torch.equal(out.tokens[given], z[given])
    lengths = []
    for s, row in zip(sources, out.tokens):
        n = read_canvas(row, CANVAS, EOS)
        assert torch.equal(row[:n], s)                        # the copy, ending at </s>
        lengths.append(n)
    assert lengths == [4, 2, 6]


def test_ddpm_cache_equals_ddpm_conditionally():
    sources, _ = random_pairs(8, 5)
    z = join(sources, [torch.full((CANVAS,), MASK)] * 8, PAD)[0]
    outs = [sample(conditional_oracle, z, SamplerConfig(sampler=name, steps=12),
                   build_schedule("loglinear"), MASK, generator=torch.Generator().manual_seed(4))
            for name in ("ddpm", "ddpm_cache")]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[1].row_calls < outs[0].row_calls


# ------------------------------------------------------------ through fairseq

MODEL = ["--arch", "mdlm_translation_tiny", "--layers", "2", "--embed-dim", "64",
         "--attention-heads", "2", "--cond-dim", "32", "--max-positions", "24",
         "--target-canvas", "10", "--dropout", "0"]


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    preprocess(write_copy(root / "raw"), root / "bin", "--source-lang", "src",
               "--target-lang", "tgt", "--joined-dictionary")
    fairseq_cli("train", root / "bin", "--user-dir", USER_DIR,
                "--task", "translation_masked_diffusion", "--criterion", "mdlm", *MODEL,
                "--batch-size", "64", "--optimizer", "adam", "--lr", "3e-3",
                "--max-update", "300", "--cpu", "--save-dir", root / "ckpt", "--seed", "3",
                "--no-epoch-checkpoints", "--num-workers", "0", "--log-interval", "50")
    return root / "bin", root / "ckpt" / "checkpoint_last.pt"


def test_copy_task_reaches_bleu_above_90_with_varying_lengths(copy_model):
    data, ckpt = copy_model
    proc = fairseq_cli("generate", data, "--user-dir", USER_DIR, "--task",
                       "translation_masked_diffusion", "--path", ckpt, "--gen-subset", "test",
                       "--sampler", "ddpm_cache", "--steps", "10", "--temperature", "0.1",
                       "--scoring", "sacrebleu", "--batch-size", "20", "--cpu")
    out = proc.stdout + proc.stderr
    m = re.search(r"BLEU = ([\d.]+) ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+)", out)
    bleu, precisions = float(m.group(1)), [float(p) for p in m.groups()[1:]]
    # every n-gram right; the brevity penalty is the few hypotheses that end early
    # (a </s> unmasked in the same step as the tokens before it): BP ~0.95 here
    assert precisions == [100.0] * 4 and bleu > 90, m.group(0)
    assert "network calls" in out
    refs = dict(re.findall(r"^T-(\d+)\t(.*)$", proc.stdout, re.M))
    hyps = dict(re.findall(r"^D-(\d+)\t\S+\t(.*)$", proc.stdout, re.M))
    assert len(hyps) == 64 and set(hyps) == set(refs)     # none left out by batching
    assert len({len(h.split()) for h in hyps.values()}) >= 4          # lengths vary
    scores = dict(re.findall(r"^P-(\d+)\t(.*)$", proc.stdout, re.M))
    for i, h in hyps.items():          # one score per token and its </s>, within the canvas
        assert len(scores[i].split()) == len(h.split()) + 1 <= 10


def test_validate_reports_the_target_bound_with_se(copy_model):
    data, ckpt = copy_model
    proc = fairseq_cli("validate", data, "--user-dir", USER_DIR, "--task",
                       "translation_masked_diffusion", "--path", ckpt, "--valid-subset",
                       "valid", "--eval-passes", "4", "--batch-size", "32", "--cpu")
    out = proc.stdout + proc.stderr
    tokens = int(re.search(r"scored_tokens (\d+)", out).group(1))
    targets = sum(len(line.split()) + 1 for line in
                  (data.parent / "raw" / "valid.tgt").read_text().splitlines())
    assert tokens == targets                        # target tokens with </s>, no padding
    loss, se = float(re.search(r"\| loss ([\d.]+)", out).group(1)), \
        float(re.search(r"bound_se ([\d.]+)", out).group(1))
    assert se < loss < 1.0                          # a bound with its SE, after learning


def test_interactive_translates_stdin_lines(copy_model):
    data, ckpt = copy_model
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.interactive", str(data), "--user-dir", USER_DIR,
         "--task", "translation_masked_diffusion", "--path", str(ckpt), "--sampler",
         "confidence", "--steps", "5", "--temperature", "0.1", "--cpu"],
        input="a b c d\nj i h g f e\n", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.findall(r"^D-\d+\t\S+\t(.*)$", proc.stdout, re.M) == ["a b c d", "j i h g f e"]


@pytest.fixture(scope="module")
def loaded(copy_model):
    from fairseq import checkpoint_utils
    data, ckpt = copy_model
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(ckpt)], arg_overrides={"data": str(data)})
    return models[0], task


def test_generator_samplers_and_source_limit(loaded):
    model, task = loaded
    d = task.source_dictionary
    sources = [d.encode_line(s, add_if_not_exist=False).long()
               for s in ("a b c", "h g f e d c b j", "d e f")]
    for sampler in SAMPLERS:
        task.args.sampler = sampler
        gen = task.build_generator([model], Namespace(temperature=0.1, nbest=1))
        hypos = gen.translate(sources)
        for s, h in zip(sources, hypos):
            assert int(h[0]["tokens"][-1]) == d.eos()
            assert h[0]["tokens"].numel() == h[0]["positional_scores"].numel() <= 10
        assert [torch.equal(h[0]["tokens"], s) for s, h in zip(sources, hypos)].count(True) >= 2
    with pytest.raises(MDLMUserError, match="a source of 15 tokens does not fit the model: "
                                            "its 24 positions hold sources of at most 14"):
        gen.translate([torch.cat([sources[1]] * 2)[:15]])


def test_bad_data_is_one_clear_error(tmp_path, copy_model):
    from mdlm_plugin.tasks.translation_masked_diffusion import (
        TranslationMaskedDiffusionConfig, TranslationMaskedDiffusionTask)
    data, _ = copy_model
    with pytest.raises(MDLMUserError, match="no data directory given"):
        TranslationMaskedDiffusionTask.setup_task(TranslationMaskedDiffusionConfig(data=""))
    mono = tmp_path / "mono"
    mono.mkdir()
    (mono / "dict.txt").write_text((data / "dict.src.txt").read_text())
    with pytest.raises(MDLMUserError, match="holds no bilingual data .* --only-source"):
        TranslationMaskedDiffusionTask.setup_task(TranslationMaskedDiffusionConfig(data=str(mono)))
    split = tmp_path / "split"
    split.mkdir()
    (split / "dict.src.txt").write_text((data / "dict.src.txt").read_text())
    (split / "dict.tgt.txt").write_text("x 5\n")
    cfg = TranslationMaskedDiffusionConfig(data=str(split), source_lang="src", target_lang="tgt")
    with pytest.raises(MDLMUserError, match="differ: .* --joined-dictionary"):
        TranslationMaskedDiffusionTask.setup_task(cfg)
    proc = fairseq_cli("generate", data, "--user-dir", USER_DIR, "--task",
                       "translation_masked_diffusion", "--path", copy_model[1],
                       "--max-source-positions", "4", "--batch-size", "32", "--cpu",
                       check=False)
    assert proc.returncode != 0
    assert re.search(r"mdlm_plugin: error: \d+ sentence pair\(s\) do not fit the model",
                     proc.stderr), proc.stderr[-2000:]
