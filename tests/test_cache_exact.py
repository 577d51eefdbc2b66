"""ddpm_cache is exact (issue 13): a row's network output does not depend on the other
rows of the call, so reusing a row's last output equals computing it again, and
ddpm_cache gives ddpm's tokens and scores for every batch composition.

The network itself (a row's logits in any batch), the generator in-process (bitwise),
and fairseq-generate end to end (printed lines, and the row evaluations the per-row
cache predicts from the denoising trajectory).
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

