"""ddpm_cache is exact (issue 13): a row's network output does not depend on the other
rows of the call, so reusing a row's last output equals computing it again, and
ddpm_cache gives ddpm's tokens and scores for every batch composition.

The network itself (a row's logits in any batch), the generator in-process (bitwise),
and fairseq-generate end to end (printed lines, and the row evaluations the per-row
cache predicts from the denoising trajectory). The same holds for the output layer
(issue 20): the MDLM's sampling denoiser runs it only where a step draws a token, with
the tokens and scores of running it at every masked position.
"""
import re

import pytest
import torch

from conftest import USER_DIR, fairseq_cli, one_thread
from mdlm_plugin.diffusion.samplers import SamplerConfig, sample
from mdlm_plugin.diffusion.schedules import build_schedule
from mdlm_plugin.generator import MaskedDiffusionGenerator
from mdlm_plugin.models.backbone import DiT
from test_generation import _lines, cli, loaded, run_all  # noqa: F401  (loaded: a fixture)

V, PAD, MASK, L = 1000, 1, 999, 24


def random_dit(time_conditioning):
    torch.manual_seed(0)
    model = DiT(V, dim=128, layers=2, heads=4, cond_dim=32, dropout=0.0, max_positions=64,
                time_conditioning=time_conditioning).eval()
    with torch.no_grad():                 # adaLN and the head start at zero: give them values
        for name, p in model.named_parameters():
            if "adaLN" in name or "head" in name:
                p.normal_(0, 0.1)
    return model


def mixed_rows():
    """8 rows: fully masked, one masked position, none but one, padded, in between."""
    g = torch.Generator().manual_seed(1)
    z = torch.randint(4, MASK, (8, L), generator=g)
    z[torch.rand(8, L, generator=g) < torch.linspace(0.1, 0.9, 8).unsqueeze(1)] = MASK
    z[0] = MASK
    z[1, :] = 7
    z[1, 5] = MASK
    z[2, 10:] = PAD
    z[2, 3] = MASK
    z[3, 20:] = PAD
    return z


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_a_rows_output_does_not_depend_on_its_batch(time_conditioning):
    model, z = random_dit(time_conditioning), mixed_rows()
    masked, padding = z == MASK, z == PAD
    sigma = torch.tensor([0.7])     # one noise level for every row, passed as the samplers
                                    # do: expanded (shared is read off the shape)

    def logits(rows):
        out = model(z[rows], sigma=sigma.expand(len(rows)), padding_mask=padding[rows],
                    positions=masked[rows])
        return out.split([int(masked[r].sum()) for r in rows])

    with torch.no_grad():
        alone = [logits([r])[0] for r in range(8)]
        for rows in ([0, 1, 2], list(range(7)), list(range(8)), [5, 1], [3, 2, 7, 1]):
            for r, out in zip(rows, logits(rows)):
                assert (out - alone[r]).abs().max() <= 1e-5, (rows, r)
        with one_thread():
            alone = [logits([r])[0] for r in range(8)]
            for rows in ([0, 1, 2], list(range(7)), list(range(8)), [5, 1], [3, 2, 7, 1]):
                assert all(torch.equal(out, alone[r]) for r, out in zip(rows, logits(rows)))


@pytest.mark.parametrize("batch", [1, 3, 7, 8])
def test_cache_equals_ddpm_bitwise_on_the_core(batch):
    """The core sampler on a random DiT (no training needed): prompts, padding, single
    masks, rows finishing at different steps; T = 40 > the 24 positions, so most steps
    change no row and ddpm_cache reuses the rows' outputs."""
    model, z = random_dit(False), mixed_rows()[:batch]
    sched = build_schedule("loglinear")

    def denoiser(zr, sigma, positions):
        return model(zr, sigma=sigma, padding_mask=zr == PAD, positions=positions)

    runs = {}
    with torch.no_grad(), one_thread():
        for name in ("ddpm", "ddpm_cache"):
            runs[name] = sample(denoiser, z, SamplerConfig(sampler=name, steps=40), sched,
                                MASK, torch.Generator().manual_seed(batch))
    ddpm, cache = runs["ddpm"], runs["ddpm_cache"]
    assert torch.equal(ddpm.tokens, cache.tokens) and torch.equal(ddpm.scores, cache.scores)
    assert not bool((cache.tokens == MASK).any())
    assert cache.row_calls < ddpm.row_calls and cache.prob_rows == ddpm.prob_rows


def test_cache_equals_ddpm_bitwise_in_process(loaded):
    """Prompts, infilling templates (shorter rows are padded) and unconditional rows,
    batches of 1, 3, 7 and 8; rows finish at different steps."""
    task, models, cfg = loaded("--steps", "100", "--gen-length", "20")
    d, m = task.source_dictionary, task.mask_index
    words = [d.index(w) for w in "the company said it in market new york".split()]
    inputs = [torch.tensor(words[:3]), torch.empty(0, dtype=torch.long),
              torch.tensor([words[0], m, words[2], m, m]), torch.tensor(words[5:]),
              torch.empty(0, dtype=torch.long), torch.full((7,), m), torch.tensor(words[:1]),
              torch.tensor([m] * 3 + words[6:])]
    with one_thread():
        for batch in (1, 3, 7, 8):
            runs = {}
            for sampler in ("ddpm", "ddpm_cache"):
                task.args.sampler = sampler
                gen = MaskedDiffusionGenerator.from_task(task, models, cfg.generation)
                hypos = gen.generate_from_prompts(inputs[:batch])
                runs[sampler] = ([h[0]["tokens"] for h in hypos],
                                 [h[0]["positional_scores"] for h in hypos], gen.stats)
            (tok_d, sc_d, st_d), (tok_c, sc_c, st_c) = runs["ddpm"], runs["ddpm_cache"]
            assert all(torch.equal(a, b) for a, b in zip(tok_d, tok_c)), batch
            assert all(torch.equal(a, b) for a, b in zip(sc_d, sc_c)), batch
            assert st_c.row_calls < st_d.row_calls


# ------------------------------------------------------------------ the CLIs

def short_lines_split(ptb_tiny, tmp_path, n=31):
    """A test split of ``n`` sentences of 3..25 words (one block each with
    --sample-break-mode eos): batches of 8 end with 7 rows, batches of 3 with 1."""
    raw = (ptb_tiny.parent / "raw" / "test.txt").read_text().splitlines()
    lines = [x for x in raw if 3 <= len(x.split()) <= 25][:n]
    assert len(lines) == n
    (tmp_path / "test.txt").write_text("\n".join(lines) + "\n")
    fairseq_cli("preprocess", "--only-source", "--srcdict", ptb_tiny / "dict.txt",
                "--testpref", tmp_path / "test.txt", "--destdir", tmp_path / "bin",
                "--workers", "1")
    return tmp_path / "bin"


def predicted_row_evaluations(text):
    """From the E- lines (the sequence before each step, then after the last):
    ddpm evaluates every row that has a mask at each step (and at the final argmax);
    the cache only a row with a mask that the previous step changed (or the first)."""
    ddpm = cache = 0
    per_row = {}
    for line in text.splitlines():
        m = re.match(r"E-(\d+)_(\d+)\t(.*)$", line)
        if m:
            per_row.setdefault(int(m.group(1)), []).append(m.group(3).split().count("<mask>"))
    for counts in per_row.values():
        counts = counts[:STEPS + 1]
        for k, c in enumerate(counts):
            ddpm += c > 0
            cache += c > 0 and (k == 0 or c < counts[k - 1])
    return ddpm, cache


STEPS = 64


def summary(text):
    m = re.search(r"mdlm sampling: (\d+) samples, \d+ tokens filled, (\d+) network calls "
                  r"\((\d+) row evaluations\)", text)
    assert m, text[-2000:]
    return int(m.group(1)), int(m.group(3))


def test_fairseq_generate_cache_equals_ddpm(ptb_tiny, trained_tiny, tmp_path):
    data = short_lines_split(ptb_tiny, tmp_path)
    common = [data, "--user-dir", USER_DIR, "--task", "masked_diffusion", "--path",
              trained_tiny[0] / "checkpoint_best.pt", "--cpu", "--tokens-per-sample", "32",
              "--gen-subset", "test", "--sample-break-mode", "eos", "--steps", STEPS,
              "--retain-iter-history", "--seed", "2"]
    for batch, extra in (("8", ["--prefix-size", "2"]), ("3", [])):
        (rc_d, out_d), (rc_c, out_c) = run_all(
            cli("generate", *common, "--batch-size", batch, *extra, "--sampler", "ddpm"),
            cli("generate", *common, "--batch-size", batch, *extra, "--sampler", "ddpm_cache"))
        assert rc_d == 0 and rc_c == 0, (out_d + out_c)[-3000:]
        for tag in ("H", "P", "E-\\d+_\\d+"):
            assert _lines(out_d, tag) == _lines(out_c, tag), tag
        assert len(_lines(out_d, "H")) == 31
        ddpm, cache = predicted_row_evaluations(out_c)
        assert summary(out_d) == (31, ddpm) and summary(out_c) == (31, cache)
        assert cache < ddpm



# ------------------------------------------------------------------ the deferred output layer

def vocabulary():
    """A dictionary of 996 words (+ <mask>) and its mask index."""
    from fairseq.data import Dictionary
    from mdlm_plugin.tasks.masked_diffusion import add_mask_symbol

    d = Dictionary()
    for i in range(996):
        d.add_symbol(f"w{i}")
    return d, add_mask_symbol(d)


def randomized(model, std=0.25):
    """``model`` in eval mode with every backbone parameter drawn at random (sd 0.25:
    x_theta's entropy ~2.3 nats, and it reads its context; at 0.3 one token takes ~0.9
    of the mass, at 0.2 and below the context hardly matters)."""
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_(0, std)
    return model.eval()


def random_mdlm(time_conditioning=False):
    """A random ``MDLMModel`` over ``vocabulary()``: (model, dictionary, mask index)."""
    from mdlm_plugin.models.mdlm import MDLMConfig, MDLMModel

    d, mask = vocabulary()
    torch.manual_seed(3)
    model = MDLMModel(MDLMConfig(embed_dim=64, layers=2, attention_heads=2, cond_dim=16,
                                 dropout=0.0, max_positions=64,
                                 time_conditioning=time_conditioning), d)
    return randomized(model), d, mask


def full_logits(model, exclude):
    """The denoiser sampling used before: training's ``denoiser()`` (the output layer
    at every masked position) with the ``exclude`` logits set to -inf."""
    denoise = model.denoiser()

    def run(z, sigma, positions):
        logits = denoise(z, sigma, positions)
        logits[:, list(exclude)] = float("-inf")
        return logits
    return run


def deferred_inputs(batch, mask, length=32):
    """Rows: unconditional; a 5-token prompt; a template with given tokens inside and
    padding after it."""
    z = torch.full((3, length), mask)
    z[1, :5] = torch.arange(5) + 40
    z[2, 3:6] = torch.arange(3) + 70
    z[2, 24:] = PAD
    return z[:batch]


def test_the_random_mdlm_reads_its_context():
    """The comparisons below mean something: a masked position's distribution moves
    when one token elsewhere changes."""
    model, _, mask = random_mdlm()
    z = deferred_inputs(2, mask)
    other = z.clone()
    other[1, 0] = 41
    with torch.no_grad():
        a, b = (model.denoiser()(x, None, x == mask) for x in (z, other))
    n = int((z[0] == mask).sum())                   # row 0 is the same in both
    assert torch.equal(a[:n], b[:n])
    assert float((a[n:].log_softmax(-1) - b[n:].log_softmax(-1)).abs().max()) > 0.1


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "analytic", "first_hitting",
                                     "remdm", "confidence"])
def test_deferred_output_layer_gives_the_full_logits_samples(sampler, batch):
    """The MDLM's sampling denoiser (the output layer at the positions a step draws)
    gives bitwise the tokens and scores of the output layer run at every masked
    position with <pad> set to -inf afterwards (one thread): the output layer pads a
    small call to 16 rows, so BLAS takes the same kernel path whatever the rows."""
    time_conditioning = sampler not in ("ddpm_cache", "first_hitting")
    model, _, mask = random_mdlm(time_conditioning)
    z = deferred_inputs(batch, mask)
    config = SamplerConfig(sampler=sampler, steps=20, time_conditioned=time_conditioning)
    sched = build_schedule("loglinear")
    runs = []
    with one_thread():
        for denoiser in (model.sampling_denoiser(exclude=(PAD,)), full_logits(model, (PAD,))):
            runs.append(sample(denoiser, z, config, sched, mask, torch.Generator().manual_seed(4)))
    deferred, full = runs
    assert torch.equal(deferred.tokens, full.tokens) and torch.equal(deferred.scores, full.scores)
    assert deferred.prob_rows == full.prob_rows and deferred.row_calls == full.row_calls
    filled = z == mask
    assert not bool((deferred.tokens == mask).any()) and bool((deferred.scores[filled] < 0).all())
    assert not bool((deferred.tokens[filled] == PAD).any())


def test_the_generator_runs_the_output_layer_only_where_a_token_is_drawn(monkeypatch):
    """ddpm_cache, T = 1000, L = 32 through the generator: the output layer computes one
    row per (position, step) where a token is drawn, the ``prob_rows`` the sampler
    reports, far fewer than the masked positions of the calls (which a denoiser
    returning logits computes)."""
    from mdlm_plugin import generator as generator_module
    from mdlm_plugin.models import backbone

    model, d, mask = random_mdlm()
    results, asked = [], []

    def spy(*args, **kwargs):
        results.append(sample(*args, **kwargs))
        return results[-1]

    def counted(denoise):
        def run(z, sigma, positions):
            asked.append(int(positions.sum()))
            return denoise(z, sigma, positions)
        return run

    real = model.sampling_denoiser
    monkeypatch.setattr(model, "sampling_denoiser", lambda exclude=(): counted(real(exclude)))
    monkeypatch.setattr(generator_module, "sample", spy)
    monkeypatch.setattr(backbone, "MIN_HEAD_ROWS", 1)      # count rows without padding
    gen = MaskedDiffusionGenerator(model, build_schedule("loglinear"), d, mask,
                                   sampler="ddpm_cache", steps=1000, gen_length=32, window=32)
    head_rows = []
    handle = model.backbone.final.register_forward_pre_hook(
        lambda m, args: head_rows.append(args[0].size(0)))
    try:
        (hypo,), = gen.generate_from_prompts([torch.empty(0, dtype=torch.long)])
    finally:
        handle.remove()
    (out,) = results
    assert sum(head_rows) == out.prob_rows == 32           # each position drawn once
    assert len(asked) == out.network_calls > 16
    assert sum(asked) > 10 * sum(head_rows)
    assert hypo["tokens"].numel() == 32 and bool((hypo["positional_scores"] < 0).all())


@pytest.mark.parametrize("sampler", ["ddpm_cache", "confidence"])
def test_pad_is_never_generated(sampler):
    """<pad> made the likeliest token everywhere (its output bias raised): the generator
    never emits it (the confidence sampler reads every masked position's logits at
    once), while the same denoiser without the exclusion draws it at most positions."""
    model, d, mask = random_mdlm()
    with torch.no_grad():
        model.backbone.final.head.bias[d.pad()] += 30.0
    gen = MaskedDiffusionGenerator(model, build_schedule("loglinear"), d, mask,
                                   sampler=sampler, steps=16, gen_length=24, window=24, nbest=2)
    template = torch.tensor([mask, 40, mask, mask, 41] + [mask] * 5)
    hypos = gen.generate_from_prompts([torch.tensor([40, 41]), template])
    for hs in hypos:
        for h in hs:
            assert not bool((h["tokens"] == d.pad()).any())
            assert not bool((h["tokens"] == mask).any())
            assert bool(torch.isfinite(h["positional_scores"]).all())
    z = torch.full((2, 24), mask)
    with torch.no_grad():
        out = sample(model.sampling_denoiser(), z, SamplerConfig(sampler=sampler, steps=16),
                     build_schedule("loglinear"), mask, torch.Generator().manual_seed(0))
    assert int((out.tokens == d.pad()).sum()) > 24


@pytest.mark.parametrize("sampler", ["ddpm_cache", "confidence"])
def test_translation_generator_deferred_equals_full_logits(sampler, monkeypatch):
    """``mdlm_translation`` inherits the sampling denoiser: translating sources of
    different lengths (so the templates are padded) gives bitwise the hypotheses of the
    full-logits denoiser (one thread)."""
    from mdlm_plugin.generator import TranslationGenerator
    from mdlm_plugin.models.mdlm_translation import (MDLMTranslationConfig,
                                                     MDLMTranslationModel)

    d, mask = vocabulary()
    torch.manual_seed(5)
    model = randomized(MDLMTranslationModel(MDLMTranslationConfig(
        embed_dim=64, layers=2, attention_heads=2, cond_dim=16, dropout=0.0,
        max_positions=32, target_canvas=12), d))
    sources = [torch.tensor([40, 41, 42, d.eos()]), torch.tensor([50, d.eos()]),
               torch.tensor(list(range(60, 75)) + [d.eos()])]
    runs = []
    with one_thread():
        for full in (False, True):
            if full:
                monkeypatch.setattr(model, "sampling_denoiser",
                                    lambda exclude=(): full_logits(model, exclude))
            gen = TranslationGenerator(model, build_schedule("loglinear"), d, mask,
                                       sampler=sampler, steps=8, nbest=2, seed=3)
            runs.append([h for hs in gen.translate(sources) for h in hs])
    for a, b in zip(*runs):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["positional_scores"], b["positional_scores"])
        assert not bool((a["tokens"] == d.pad()).any())
