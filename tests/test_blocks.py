"""Block diffusion (BD3-LM, ``--block-size``): the objective, the 2L attention,
cached block-by-block sampling, the backbone's attention, bad input, and the
fairseq CLIs end to end.

The network is a small DiT with every parameter drawn at random (the zero-init
head and adaLN would make all outputs equal and every comparison vacuous).
"""
import contextlib
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL, USER_DIR, fairseq_cli, one_thread
from mdlm_plugin.diffusion.blocks import (block_nelbo, check_block_size, check_mask_rate,
                                          sample_blocks)
from mdlm_plugin.diffusion.objective import log_probs_without_mask, nelbo
from mdlm_plugin.diffusion.samplers import SamplerConfig, sample
from mdlm_plugin.diffusion.schedules import build_schedule
from mdlm_plugin.errors import MDLMUserError
from mdlm_plugin.models import backbone
from mdlm_plugin.models.backbone import BlockKVCache, DiT
from mdlm_plugin.models.mdlm import CachedBlocks

V, MASK, PAD = 40, 39, 1
SCHEDULE = build_schedule("loglinear")


def random_dit(seed=0, time_conditioning=False, std=0.3):
    torch.manual_seed(seed)
    net = DiT(V, 32, 2, 2, cond_dim=16, dropout=0.0, max_positions=64,
              time_conditioning=time_conditioning).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net


def tokens(rows, length, seed=1):
    return torch.randint(3, MASK, (rows, length), generator=torch.Generator().manual_seed(seed))


def block_denoiser(net, x, block_size, capture=None):
    pad = x.eq(PAD)

    def run(z, sigma, positions):
        logits = net.forward_blocks(z, x, block_size, sigma=sigma, padding_mask=pad,
                                    positions=positions)
        if capture is not None:
            capture.append((positions.clone(), logits))
        return logits
    return run


def seeded():
    return torch.Generator().manual_seed(7)


# ------------------------------------------------------------------ the objective

@torch.no_grad()
def test_whole_window_block_is_mdlm():
    net, x = random_dit(), tokens(4, 16)
    x[1, 12:] = PAD
    pad = x.eq(PAD)
    plain = nelbo(lambda z, s, p: net(z, s, padding_mask=pad, positions=p), x, SCHEDULE,
                  MASK, pad, generator=seeded())
    block = block_nelbo(block_denoiser(net, x, 16), x, SCHEDULE, MASK, pad, block_size=16,
                        generator=seeded())
    assert torch.equal(block.t[:, 0], plain.t) and block.n_masked == plain.n_masked > 0
    assert abs(block.loss.item() - plain.loss.item()) / plain.n_tokens < 1e-6
    # no --block-size and no --train-mask-rate: MDLM's nelbo itself, bit for bit
    same = block_nelbo(lambda z, s, p: net(z, s, padding_mask=pad, positions=p), x,
                       SCHEDULE, MASK, pad, generator=seeded())
    assert torch.equal(same.loss, plain.loss) and torch.equal(same.t, plain.t)


def left_to_right_nll(net, x):
    """-sum log p(x_i | x_<i) read off the network one position at a time: commit
    the clean tokens one by one into the cache, ask about a <mask> after them."""
    cache, total = BlockKVCache(context=x.size(1)), torch.zeros(())
    masked = torch.ones(x.size(0), 1, dtype=torch.bool)
    for i in range(x.size(1)):
        logits = net.block_step(torch.full_like(x[:, :1], MASK), cache, positions=masked)
        total -= log_probs_without_mask(logits, MASK).gather(1, x[:, i:i + 1]).sum()
        net.block_step(x[:, i:i + 1], cache, commit=True)
    return total


@torch.no_grad()
def test_block_size_one_fully_masked_is_left_to_right_nll():
    net, x = random_dit(1), tokens(3, 12)
    terms = block_nelbo(block_denoiser(net, x, 1), x, SCHEDULE, MASK, block_size=1,
                        mask_rate=(1.0, 1.0), generator=seeded())
    assert terms.n_masked == x.numel()
    assert torch.allclose(terms.loss, left_to_right_nll(net, x), rtol=0, atol=1e-5 * x.numel())


@torch.no_grad()
def test_mask_rate_range_is_respected():
    net, x = random_dit(), tokens(8, 16)
    terms = block_nelbo(block_denoiser(net, x, 4), x, SCHEDULE, MASK, block_size=4,
                        mask_rate=(0.3, 0.6), generator=seeded())
    assert terms.t.shape == (8, 4) and bool(((terms.t >= 0.3) & (terms.t <= 0.6)).all())
    # antithetic over all 32 blocks of the batch: an even grid of step 0.3 / 32
    gaps = terms.t.flatten().sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 0.3 / 32), atol=1e-5)


@torch.no_grad()
def test_clipped_mask_rate_keeps_its_one_over_t_weight():
    """With the rate fixed at (0.5, 0.5) every masked token's cross-entropy is weighted by
    1/t = 2: the loss is exactly twice the masked tokens' summed cross-entropy, read off
    the network independently of the objective."""
    net, x = random_dit(3), tokens(6, 16, seed=4)
    seen = []
    terms = block_nelbo(block_denoiser(net, x, 4, capture=seen), x, SCHEDULE, MASK,
                        block_size=4, mask_rate=(0.5, 0.5), generator=seeded())
    assert bool((terms.t == 0.5).all()) and 0 < terms.n_masked < x.numel()
    (masked, logits), = seen          # the denoiser scores the masked positions only
    assert int(masked.sum()) == terms.n_masked == logits.size(0)
    lp = log_probs_without_mask(logits.double(), MASK)
    ce = -lp.gather(-1, x[masked].unsqueeze(-1)).sum()
    assert terms.loss.item() == pytest.approx(2 * ce.item(), rel=1e-5)


@torch.no_grad()
def test_block_causality():
    net, x = random_dit(2), tokens(2, 16)
    capture = []
    block_nelbo(block_denoiser(net, x, 4, capture), x, SCHEDULE, MASK, block_size=4,
                generator=seeded())
    seen = (~capture[0][0][0, 8:12]).nonzero()[0, 0] + 8   # an unmasked token of block 2
    y = x.clone()
    y[0, seen] = (x[0, seen] + 1 - 3) % (MASK - 3) + 3
    out = []
    for seq in (x, y):
        capture = []
        terms = block_nelbo(block_denoiser(net, seq, 4, capture), seq, SCHEDULE, MASK,
                            block_size=4, generator=seeded())
        positions, logits = capture[0]
        nll = -log_probs_without_mask(logits, MASK).gather(1, seq[positions][:, None])
        out.append((positions, logits, nll.squeeze(1), terms))
    (px, lx, nx, _), (py, ly, ny, _) = out
    assert torch.equal(px, py)                             # same times, same masks
    block_of = px.nonzero()[:, 1] // 4
    early = block_of < 2
    assert bool(early.any()) and bool(px[0, 8:].any())
    torch.testing.assert_close(lx[early], ly[early], rtol=0, atol=1e-6)
    torch.testing.assert_close(nx[early], ny[early], rtol=0, atol=1e-6)
    assert not torch.allclose(lx[~early], ly[~early])      # block 2 and later see it
    full_x = net.forward_blocks(x, x, 4)
    full_y = net.forward_blocks(y, y, 4)
    torch.testing.assert_close(full_x[:, :8], full_y[:, :8], rtol=0, atol=1e-6)


@pytest.mark.parametrize("time_conditioning", [False, True])
@torch.no_grad()
def test_vectorised_2l_pass_equals_a_loop_over_blocks(time_conditioning):
    net, x = random_dit(3, time_conditioning), tokens(3, 16)
    z = x.masked_fill(torch.rand(x.shape, generator=seeded()) < 0.5, MASK)
    sigma = torch.rand(3, 4, generator=seeded()).repeat_interleave(4, 1)
    fast = net.forward_blocks(z, x, 4, sigma=sigma)
    for b in range(4):
        cache = BlockKVCache(context=16)
        for j in range(b):                                # the clean blocks before b
            net.block_step(x[:, 4 * j:4 * j + 4], cache, commit=True)
        slow = net.block_step(z[:, 4 * b:4 * b + 4], cache, sigma=sigma[:, 4 * b])
        torch.testing.assert_close(fast[:, 4 * b:4 * b + 4], slow, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the backbone's attention

@torch.no_grad()
def test_right_padding_is_invisible():
    net, x = random_dit(4), tokens(1, 12)
    padded = torch.cat([x, torch.full((1, 5), PAD)], 1)
    pad = padded.eq(PAD)
    torch.testing.assert_close(net(padded, padding_mask=pad)[:, :12], net(x),
                               rtol=1e-5, atol=1e-5)
    z = x.masked_fill(torch.rand(x.shape, generator=seeded()) < 0.5, MASK)
    zp = torch.cat([z, torch.full((1, 4), PAD)], 1)
    xp = torch.cat([x, torch.full((1, 4), PAD)], 1)
    torch.testing.assert_close(net.forward_blocks(zp, xp, 4, padding_mask=xp.eq(PAD))[:, :12],
                               net.forward_blocks(z, x, 4), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rotary_on_queries_and_keys():
    net, x = random_dit(5), tokens(1, 8)
    outs = []
    for position in (0, 13):
        cache = BlockKVCache(context=0)
        cache.position = position
        outs.append(net.block_step(x, cache))
    # relative positions only: the same tokens shifted give the same outputs
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert torch.allclose(outs[0], net(x), atol=1e-5)
    swapped = x.clone()
    swapped[0, [0, 1]] = x[0, [1, 0]]
    assert not torch.allclose(net(x)[0, 5], net(swapped)[0, 5], atol=1e-3)


# ------------------------------------------------------------------ sampling

class Uncached:
    """Block by block without a cache: every call runs the committed tokens again
    through the 2L forward (the noisy block last)."""

    def __init__(self, net, block_size):
        self.net, self.block_size, self.done, self.commits = net, block_size, None, 0

    def denoise(self, rows, z, sigma, positions):
        prefix = z[:, :0] if self.done is None else self.done[rows]
        seq = torch.cat([prefix, z], 1)
        where = torch.cat([torch.zeros_like(prefix, dtype=torch.bool), positions], 1)
        return self.net.forward_blocks(seq, seq, self.block_size, sigma=sigma, positions=where)

    def commit(self, block):
        self.done = block if self.done is None else torch.cat([self.done, block], 1)
        self.commits += 1

    def keep(self, index):
        self.done = self.done[index]


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "first_hitting", "remdm", "confidence"])
def test_cached_sampling_equals_uncached(sampler):
    # weights of sd 0.1: at 0.3 this net gives one token p ~ 0.991 at almost every
    # position, so the confidence sampler's order is a near-tie (gaps ~1e-5) that the
    # cached and uncached paths' float rounding decides differently on some CPUs
    net = random_dit(6, std=0.1)
    z = torch.full((4, 16), MASK)
    z[0, :6] = tokens(1, 6)[0]                              # prompts of 6, 2 and 0 tokens
    z[1, :2] = tokens(1, 2, seed=3)[0]
    config = SamplerConfig(sampler=sampler, steps=5)
    cached = CachedBlocks(net, context=16 - 4)
    a = sample_blocks(cached, z, 4, config, SCHEDULE, MASK, torch.Generator().manual_seed(9))
    reference = Uncached(net, 4)
    b = sample_blocks(reference, z, 4, config, SCHEDULE, MASK, torch.Generator().manual_seed(9))
    assert torch.equal(a.tokens, b.tokens) and not bool((a.tokens == MASK).any())
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.tokens[0, :6], z[0, :6]) and torch.equal(a.tokens[1, :2], z[1, :2])
    assert cached.commits == reference.commits == 3        # once per committed block
    assert cached.cache.length == 12 and cached.cache.position == 12
    if sampler == "first_hitting":       # one row evaluation per masked token, + commits
        assert a.row_calls == int((z == MASK).sum()) + 3 * 4     # 3 commits of 4 rows


def denoise_after(net, before, block_size):
    """A block's denoiser given the clean tokens ``before`` it (the 2L forward)."""
    def run(z, sigma, positions, rows):
        seq = torch.cat([before[rows], z], 1)
        where = torch.cat([torch.zeros_like(before[rows], dtype=torch.bool), positions], 1)
        return net.forward_blocks(seq, seq, block_size, sigma=sigma, positions=where)
    return run


def blocks_one_by_one(net, z, block_size, config, seed, context=None):
    """An independent loop: each block sampled by ``samplers.sample`` given the final
    tokens of the blocks before it (or ``context(tokens so far)``); tokens, scores."""
    g, done, scores = torch.Generator().manual_seed(seed), z[:, :0], []
    for start in range(0, z.size(1), block_size):
        before = done if context is None else context(done)
        out = sample(denoise_after(net, before, block_size), z[:, start:start + block_size],
                     config, SCHEDULE, MASK, g, row_indexed=True)
        done = torch.cat([done, out.tokens], 1)
        scores.append(out.scores)
    return done, torch.cat(scores, 1)


@contextlib.contextmanager
def inputs_of(module):
    """The shapes of the first input of each call of ``module`` within the block."""
    shapes = []
    handle = module.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    try:
        yield shapes
    finally:
        handle.remove()


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("sampler", ["ddpm", "remdm"])
def test_block_sampling_commits_each_blocks_final_tokens(sampler, fuse):
    """On a context-sensitive network (weights of sd 0.3) the cached block sampler
    gives the tokens and scores of a loop that denoises each block given the final
    tokens of the blocks before it. Given the blocks as they were before sampling
    (masks) instead, the scores (the log-probabilities of the drawn tokens) move by
    far more than the tolerance, so committing anything but the final tokens fails.
    Fused, each commit runs in the next block's first pass (one pass fewer each)."""
    net = random_dit(11, std=0.3)
    z = torch.full((4, 12), MASK)
    z[0, :3] = tokens(1, 3)[0]
    config = SamplerConfig(sampler=sampler, steps=6)
    cached = CachedBlocks(net, context=12 - 4, fuse=fuse)
    with inputs_of(net.blocks[0]) as passes:
        a = sample_blocks(cached, z, 4, config, SCHEDULE, MASK, torch.Generator().manual_seed(5))
    assert len(passes) == a.network_calls - (cached.commits if fuse else 0)
    want, want_scores = blocks_one_by_one(net, z, 4, config, 5)
    assert torch.equal(a.tokens, want) and not bool((want == MASK).any())
    torch.testing.assert_close(a.scores, want_scores, rtol=0, atol=1e-4)
    _, noisy_scores = blocks_one_by_one(net, z, 4, config, 5,
                                        context=lambda done: z[:, :done.size(1)])
    assert torch.equal(noisy_scores[:, :4], want_scores[:, :4])      # the first block: no context
    assert float((noisy_scores[:, 4:] - want_scores[:, 4:]).abs().max()) > 1e-2


class EagerHead(CachedBlocks):
    """The cached context with the output layer run at every position asked for (each
    called row's masked positions), as a denoiser returning logits does."""

    def denoise(self, rows, z, sigma, positions):
        return super().denoise(rows, z, sigma, positions).logits()


def prompted_rows(rows=4, length=20):
    """Prompts of 6 and 2 tokens, a template with given tokens inside a block, no prompt."""
    z = torch.full((rows, length), MASK)
    z[0, :6] = tokens(1, 6)[0]
    z[1, :2] = tokens(1, 2, seed=3)[0]
    z[2, 9:12] = tokens(1, 3, seed=4)[0]
    return z


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "first_hitting", "remdm", "confidence"])
def test_output_layer_runs_only_where_a_token_is_drawn(sampler, monkeypatch):
    """The output layer sees the positions where a step draws a token, once each (as
    many as the float64 distributions computed, ``prob_rows``; for ddpm and first
    hitting every masked position once), not every masked position of each called row;
    the tokens and scores are bitwise those of the output layer run everywhere (one
    thread)."""
    net, z = random_dit(6, std=0.3), prompted_rows()
    config = SamplerConfig(sampler=sampler, steps=5)
    runs = {}
    with one_thread():
        for context in (CachedBlocks, EagerHead):
            runs[context] = sample_blocks(context(net, 12), z, 4, config, SCHEDULE, MASK,
                                          torch.Generator().manual_seed(3))
    lazy, eager = runs[CachedBlocks], runs[EagerHead]
    assert torch.equal(lazy.tokens, eager.tokens) and torch.equal(lazy.scores, eager.scores)
    monkeypatch.setattr(backbone, "MIN_HEAD_ROWS", 1)      # count rows without padding
    rows = {}
    for context in (CachedBlocks, EagerHead):
        with inputs_of(net.final) as calls:
            out = sample_blocks(context(net, 12), z, 4, config, SCHEDULE, MASK,
                                torch.Generator().manual_seed(3))
        rows[context] = sum(shape[0] for shape in calls)
    assert rows[CachedBlocks] == out.prob_rows
    if sampler in ("ddpm", "ddpm_cache", "first_hitting"):
        assert rows[CachedBlocks] == int((z == MASK).sum())
    if sampler != "confidence":             # it draws at every masked position
        assert rows[EagerHead] > rows[CachedBlocks]


class ConcatCache:
    """A block cache grown by concatenation (every call copies it), keeping the last
    ``context`` positions of each commit: the reference for ``BlockKVCache``."""

    def __init__(self, context):
        self.context, self.k, self.v, self.committing = context, {}, {}, False

    def append(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        if self.committing:
            self.k[layer], self.v[layer] = k[:, :, -self.context:], v[:, :, -self.context:]
        return k, v


def concat_step(net, cache, block, position, commit=False):
    """Logits (B, L', V) of ``block`` at ``position`` through ``ConcatCache``."""
    h = net.embed(block)
    cos, sin = net.rotary(block.size(1), h.device, h.dtype, offset=position)
    c = net.condition(block.size(0), None, h.device)
    cache.committing = commit
    for i, layer in enumerate(net.blocks):
        h = layer(h, c, cos, sin, None, cache, i)
    return net.final(h, c) + net.logit_mask


@torch.no_grad()
def test_cache_is_written_in_place_and_slides_as_a_concatenated_one(monkeypatch):
    """Ten blocks through a context of 8 positions (the cache slides): each block's
    logits are those of a cache grown by concatenation. A pass over every row attends
    to views of the layer buffers (their storage: no gather, no concatenation of the
    cache), and the buffers are allocated once and moved once in all the passes; a pass
    over some rows gathers them. Even blocks fuse the pending commit with a pass over
    every row, odd ones run it alone (the first pass is over some rows)."""
    net, x = random_dit(9), tokens(3, 40)
    z = x.masked_fill(torch.rand(x.shape, generator=seeded()) < 0.5, MASK)
    cache, reference, some = BlockKVCache(context=8), ConcatCache(8), torch.tensor([0, 2])
    keys, buffers, sdpa = [], set(), F.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):        # every attention's keys, recorded
        keys.append(k)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)

    def step(block, rows=None):
        keys.clear()
        out = net.block_step(block if rows is None else block[rows], cache, rows=rows)
        stored = {b.untyped_storage().data_ptr() for b in cache.keys}
        views = [k.untyped_storage().data_ptr() in stored for k in keys]
        buffers.add(tuple(b.data_ptr() for b in cache.keys + cache.values))
        return out, views

    for b in range(10):
        block = z[:, 4 * b:4 * b + 4]
        want = concat_step(net, reference, block, 4 * b)
        for rows in ((None, some) if b % 2 == 0 else (some, None)):
            got, views = step(block, rows)
            torch.testing.assert_close(got, want if rows is None else want[rows], rtol=0,
                                       atol=1e-5)
            if b > 0:     # over some rows: one gathered key per layer, last (after the
                n = 0 if rows is None else len(net.blocks)       # commit's pass, if any)
                assert all(views[:len(views) - n]) and not any(views[len(views) - n:])
        net.block_step(x[:, 4 * b:4 * b + 4], cache, commit=True)
        concat_step(net, reference, x[:, 4 * b:4 * b + 4], 4 * b, commit=True)
    assert cache.length == 8 and cache.position == 40
    assert len(buffers - {()}) == 2


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "first_hitting", "remdm", "confidence"])
def test_commit_fused_with_the_next_first_step_is_exact(sampler):
    """The commit of a block run in the next block's first pass gives the tokens and
    scores of the commit run alone, bit for bit (one thread), one pass fewer per
    commit (every row has a mask in every block here, so every commit is fused); with
    time conditioning the clean and noisy blocks need two conditioning vectors and the
    commit runs alone."""
    z, config = prompted_rows(), SamplerConfig(sampler=sampler, steps=5)
    for time_conditioning in ((False, True) if sampler == "ddpm" else (False,)):
        net, runs = random_dit(11, time_conditioning=time_conditioning, std=0.3), {}
        with one_thread():
            for fuse in (True, False):
                with inputs_of(net.blocks[0]) as passes:
                    out = sample_blocks(CachedBlocks(net, 12, fuse=fuse), z, 4, config,
                                        SCHEDULE, MASK, torch.Generator().manual_seed(8))
                runs[fuse] = out, len(passes)
        (fused, n_fused), (alone, n_alone) = runs[True], runs[False]
        assert torch.equal(fused.tokens, alone.tokens) and torch.equal(fused.scores, alone.scores)
        assert n_alone == alone.network_calls
        assert n_fused == n_alone - (0 if time_conditioning else 4)


def test_beyond_the_window_the_cache_slides():
    """Past the window the cache keeps the keys and values of the last window - L'
    positions (as computed when committed), at growing rotary positions; until the
    first slide it is exactly the uncached sampler."""
    net, window = random_dit(8), 12
    z = torch.full((3, 28), MASK)
    config = SamplerConfig(sampler="ddpm", steps=3)
    cached = CachedBlocks(net, context=window - 4)
    a = sample_blocks(cached, z, 4, config, SCHEDULE, MASK, torch.Generator().manual_seed(4))
    b = sample_blocks(Uncached(net, 4), z[:, :window], 4, config, SCHEDULE, MASK,
                      torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens[:, :window], b.tokens) and not bool((a.tokens == MASK).any())
    assert cached.commits == 6 and cached.cache.length == 8 and cached.cache.position == 24


def test_stop_token_gives_rows_of_different_lengths():
    net = random_dit(7)
    stop = 5
    with torch.no_grad():
        net.final.head.bias[stop] += 3.0                    # a likely token
    z = torch.full((6, 24), MASK)
    z[:, :3] = tokens(6, 3)
    cached = CachedBlocks(net, context=24 - 4)
    out = sample_blocks(cached, z, 4, SamplerConfig(sampler="ddpm_cache", steps=4), SCHEDULE,
                        MASK, torch.Generator().manual_seed(2), stop_token=stop)
    lengths = out.lengths.tolist()
    assert len(set(lengths)) > 1
    for row, n in zip(out.tokens, lengths):
        assert n == 24 or (row[n - 1] == stop and not bool((row[3:n - 1] == stop).any()))
    assert torch.equal(out.tokens[:, :3], z[:, :3])         # prompts kept
    assert any(n < 24 for n in lengths)


# ------------------------------------------------------------------ bad input

def test_bad_block_options():
    with pytest.raises(ValueError, match="must divide"):
        check_block_size(5, 32)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=">= 1"):
            check_block_size(bad, 32)
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.0, 0.0), (0.5,)):
        with pytest.raises(ValueError, match="mask-rate"):
            check_mask_rate(bad)
    assert check_mask_rate([0.3, 0.8]) == (0.3, 0.8)


def test_block_model_with_time_conditioning_refuses_ddpm_cache():
    from fairseq.data import Dictionary
    from mdlm_plugin.generator import MaskedDiffusionGenerator
    from mdlm_plugin.models.mdlm import MDLMConfig, MDLMModel
    from mdlm_plugin.tasks.masked_diffusion import add_mask_symbol

    dictionary = Dictionary()
    for w in "a b c".split():
        dictionary.add_symbol(w)
    mask = add_mask_symbol(dictionary)
    model = MDLMModel(MDLMConfig(embed_dim=16, layers=1, attention_heads=2, cond_dim=8,
                                 time_conditioning=True, block_size=4), dictionary)
    kw = dict(gen_length=8, window=8)
    with pytest.raises(MDLMUserError, match="--sampler: sampler 'ddpm_cache' needs a model without time"):
        MaskedDiffusionGenerator(model, SCHEDULE, dictionary, mask, sampler="ddpm_cache", **kw)
    with pytest.raises(MDLMUserError, match="--semi-ar-stride does not apply"):
        MaskedDiffusionGenerator(model, SCHEDULE, dictionary, mask, sampler="ddpm",
                                 semi_ar_stride=4, **kw)
    model.cfg.block_size = None
    with pytest.raises(MDLMUserError, match="--stop-at-eos needs a block-diffusion model"):
        MaskedDiffusionGenerator(model, SCHEDULE, dictionary, mask, sampler="ddpm",
                                 stop_at_eos=True, **kw)


# ------------------------------------------------------------------ the fairseq CLIs

def train(data, save, *extra, updates=4):
    return fairseq_cli(
        "train", data, "--user-dir", USER_DIR, "--task", "masked_diffusion",
        "--criterion", "mdlm", *TINY_MODEL, "--batch-size", "16", "--optimizer", "adam",
        "--lr", "3e-3", "--max-update", str(updates), "--cpu", "--save-dir", save,
        "--seed", "3", "--no-epoch-checkpoints", "--num-workers", "0", *extra)


def test_cli_fine_tune_validate_generate(ptb_tiny, trained_tiny, tmp_path):
    block = tmp_path / "block"                             # from the MDLM checkpoint
    log = train(ptb_tiny, block, "--block-size", "8", "--train-mask-rate", "0.3", "0.8",
                "--finetune-from-model", trained_tiny[0] / "checkpoint_last.pt")
    assert "loading pretrained model from" in log.stdout + log.stderr
    ckpt = block / "checkpoint_last.pt"
    assert torch.load(ckpt, weights_only=False)["cfg"]["model"]["block_size"] == 8
    proc = fairseq_cli("validate", ptb_tiny, "--user-dir", USER_DIR, "--task",
                       "masked_diffusion", "--path", ckpt, "--valid-subset", "test",
                       "--tokens-per-sample", "32", "--batch-size", "16", "--eval-passes", "2",
                       "--cpu")
    bound = re.search(r"loss ([\d.]+) \| mask_frac ([\d.]+).*bound_se ([\d.]+)",
                      proc.stdout + proc.stderr)
    assert bound and float(bound.group(3)) > 0
    assert abs(float(bound.group(2)) - 0.5) < 0.05        # eval masks over [0, 1], not [0.3, 0.8]
    # one sentence per input (a prompt never starts with the previous line's </s>)
    gen = fairseq_cli("generate", ptb_tiny, "--user-dir", USER_DIR, "--task",
                      "masked_diffusion", "--path", ckpt, "--tokens-per-sample", "32",
                      "--gen-subset", "test", "--sample-break-mode", "eos", "--batch-size", "16",
                      "--steps", "4", "--prefix-size", "3", "--gen-length", "48",
                      "--stop-at-eos", "--seed", "1", "--cpu").stdout
    targets = dict(re.findall(r"^T-(\d+)\t(.*)$", gen, re.M))
    hypos = re.findall(r"^H-(\d+)\t\S+\t(.*)\n(?:D-.*\n)?P-\d+\t(.*)$", gen, re.M)
    assert len(hypos) == len(targets) > 100
    lengths = []
    for i, text, scores in hypos:
        n, words = len(scores.split()), text.split()       # P- counts </s>, H- drops it
        prompt = targets[i].replace("<<unk>>", "<unk>").split()[:3]
        if len(prompt) == 3:                               # else the prompt holds </s>
            assert words[:3] == prompt
            assert n == 48 or (n < 48 and len(words) == n - 1)   # else it ended with </s>
            lengths.append(n)
    assert len(set(lengths)) > 5 and min(lengths) < 48


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "5"], "--block-size: the block size 5 must divide the window of 32"),
    (["--train-mask-rate", "0.8", "0.2"], "--train-mask-rate: the mask-rate range must"),
])
def test_cli_bad_block_flags(ptb_tiny, tmp_path, flags, message):
    proc = fairseq_cli("train", ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                       "--criterion", "mdlm", *TINY_MODEL, *flags, "--max-update", "1",
                       "--batch-size", "2", "--cpu", "--save-dir", tmp_path, check=False)
    assert proc.returncode != 0
    assert f"mdlm_plugin: error: {message}" in proc.stderr and "Traceback" not in proc.stderr
