"""The MDLM backbone: a diffusion transformer (DiT) read top to bottom. Pure torch.

Token embedding -> N blocks -> final adaLN layer -> untied, zero-initialised head.
Each block: weight-only LayerNorm (fp32) -> adaLN-Zero modulation (shift, scale,
gate from a conditioning vector) -> attention with rotary q/k through
``scaled_dot_product_attention`` (bidirectional, or causal for the AR twin) ->
gated residual; then the same around a 4x GELU(tanh) MLP.

``logit_mask`` (a buffer, in every checkpoint) is added to the logits: 0 for a
symbol the model may predict, -inf for one it must never predict (a converted
model's rows that its training never saw, see ``mdlm_plugin/convert.py``). It is
all zeros unless set, and checkpoints saved before it existed load with zeros.

The conditioning vector comes from the noise level sigma through a sinusoidal
embedding and an MLP. Without time conditioning (the paper's default) sigma is
replaced by 0, so the vector is a learned constant and the output depends on the
tokens alone.

A causal model can decode incrementally: pass a :class:`KVCache` and only the new
tokens; each block appends their rotated keys and values to the cache, and the
new positions' rotary angles start at the cached length.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# the output layer runs on at least this many positions (see DiT.forward)
MIN_HEAD_ROWS = 16
# block diffusion's training attention: flex where available (CUDA), else SDPA
BLOCK_ATTENTION = ("auto", "flex", "sdpa")


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32 (stable under --fp16/--amp)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), (self.dim,), self.weight.float()).type_as(x)


def modulate(x, shift, scale):
    """adaLN affine transform x * (1 + scale) + shift, with shift/scale shaped to
    broadcast over x (one fused op: elementwise passes dominate small models on CPU)."""
    return torch.addcmul(shift, x, 1 + scale)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form), cos/sin cached per length."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache = (0, None, None, None)

    def forward(self, length: int, device, dtype, offset: int = 0):
        """cos, sin (length, head_dim) of positions offset .. offset + length - 1."""
        end = offset + length
        n, dev, cos, sin = self._cache
        if n < end or dev != device or cos.dtype != dtype:
            pos = torch.arange(max(end, n), device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            self._cache = (pos.numel(), device, cos, sin)
        return cos[offset:end], sin[offset:end]


def apply_rotary(x, cos, sin):
    """x: (B, H, L, Dh); rotate pairs (i, i + Dh/2) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> sinusoidal features -> MLP -> conditioning vector (B, C)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device,
                                                              dtype=torch.float32) / half)
        args = sigma.float().unsqueeze(-1) * freqs
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class KVCache:
    """Keys and values of the positions decoded so far, for a causal DiT.

    One (B, heads, T, head_dim) key and value tensor per block, kept in a plain
    dict of tensors (``store``) so a caller can keep it wherever it likes (fairseq
    keeps it in its ``incremental_state``). Keys are stored already rotated.
    """

    def __init__(self, store: Optional[Dict[str, torch.Tensor]] = None):
        self.store = {} if store is None else store

    @property
    def length(self) -> int:
        """Number of positions cached (0 when empty)."""
        k = self.store.get("k0")
        return 0 if k is None else k.size(2)

    def append(self, layer: int, k, v) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' k, v of one block; return all of that block's."""
        kk, vk = f"k{layer}", f"v{layer}"
        if kk in self.store:
            k = torch.cat([self.store[kk], k], dim=2)
            v = torch.cat([self.store[vk], v], dim=2)
        self.store[kk], self.store[vk] = k, v
        return k, v

    def reorder(self, new_order):
        """Keep batch rows ``new_order`` (in that order), e.g. after beam selection."""
        for key, t in self.store.items():
            self.store[key] = t.index_select(0, new_order)


class BlockKVCache:
    """Keys and values of the committed clean blocks, for block-diffusion sampling
    with a bidirectional DiT (``DiT.block_step``), in preallocated buffers.

    Each layer keeps its keys (stored rotated) and values in one (B, heads, slots,
    head_dim) buffer; the cached positions are the slots ``[lo, hi)``, oldest first, at
    most the last ``context`` committed positions (a block sees at most window - L'
    clean positions in training). A pass of the network writes its new keys and values
    in place after them, and each of its segments attends to a window of the buffer (a
    view, no copy): a clean block being committed to the cache and to itself, a noisy
    block to the last ``context`` committed positions and to itself (it stores nothing:
    its slots are overwritten by the next pass). A noisy pass over some rows only
    (``rows``: sorted, unique; None or all of them is every row) writes and reads
    those rows (a gather). When the slots run out, the cached positions move to the
    front of new buffers (2 x (context + pass) slots: once per ~context / L' blocks).

    A committed block is ``pending`` until the next pass: with ``fuse`` it runs in the
    same pass as the next noisy block (one network call instead of two, with the same
    numbers: each segment attends to the same keys and values as in a pass of its own,
    and the other operations act on each position alone, so the results are bitwise
    equal wherever a matmul's rows do not depend on how many rows it has, as on one CPU
    thread); alone when that pass is over some rows only, the model cannot fuse them
    (``DiT.block_hidden``) or another commit comes first. ``position`` is the absolute
    position of the next block (rotary angles), the pending block included; it keeps
    growing when old positions leave the cache.
    """

    def __init__(self, context: int, fuse: bool = True):
        self.context, self.fuse, self.position = context, fuse, 0
        self.pending: Optional[torch.Tensor] = None
        self.keys, self.values = [], []
        self.batch = self.lo = self.hi = self.slots = 0
        self._pass = None

    @property
    def length(self) -> int:
        """Number of committed positions the next block attends to."""
        pending = 0 if self.pending is None else self.pending.size(1)
        return min(self.context, self.hi - self.lo + pending)

    def defer(self, tokens: torch.Tensor) -> None:
        """Commit the clean block ``tokens`` (B, L') at the next pass (none is pending)."""
        if self.context > 0:
            self.pending = tokens
        self.position += tokens.size(1)

    def begin(self, clean: int, noisy: int, rows: Optional[torch.Tensor]) -> int:
        """Set up a pass of the pending block's ``clean`` positions (0 or all of them),
        then ``noisy`` positions of the rows ``rows``; returns its first rotary position."""
        if clean:
            self.batch = self.pending.size(0)
        elif rows is not None and rows.numel() == self.batch:
            rows = None
        n, move = clean + noisy, None
        direct = self.hi == self.lo and not clean     # nothing cached: itself only
        if not direct and self.hi + n > self.slots:
            self.slots = max(self.slots, 2 * (self.context + n))
            move, self.lo, self.hi = (self.lo, self.hi), 0, self.hi - self.lo
        at = self.hi
        segments = []
        if clean:
            segments.append((0, clean, self.lo, at + clean))
        if noisy:
            segments.append((clean, n, max(self.lo, at + clean - self.context), at + n))
        self._pass = (direct, move, at, rows, segments, clean)
        return self.position - clean

    def end(self) -> None:
        """After the pass: the clean positions join the cache."""
        clean = self._pass[-1]
        if clean:
            self.hi += clean
            self.lo = max(self.lo, self.hi - self.context)
            self.pending = None
        self._pass = None

    def attention(self, layer: int):
        """This pass's attention (q, k, v) -> output of ``layer`` (a ``DiTBlock`` mask)."""
        return functools.partial(self._attend, layer)

    def _attend(self, layer: int, q, k, v):
        direct, _, _, rows, segments, _ = self._pass
        if direct:
            return F.scaled_dot_product_attention(q, k, v)
        kb, vb = self._write(self.keys, layer, k), self._write(self.values, layer, v)
        out = []
        for q0, q1, k0, k1 in segments:
            kw, vw = kb[:, :, k0:k1], vb[:, :, k0:k1]
            if rows is not None:
                kw, vw = kw.index_select(0, rows), vw.index_select(0, rows)
            out.append(F.scaled_dot_product_attention(q[:, :, q0:q1], kw, vw))
        return out[0] if len(out) == 1 else torch.cat(out, 2)

    def _write(self, buffers, layer: int, new):
        """The layer's buffer (moved first when due) with ``new`` written in place."""
        _, move, at, rows, _, _ = self._pass
        if move is not None:
            b = new.new_empty(self.batch, new.size(1), self.slots, new.size(3))
            if layer < len(buffers):
                b[:, :, :move[1] - move[0]] = buffers[layer][:, :, move[0]:move[1]]
                buffers[layer] = b
            else:
                buffers.append(b)
        dst = buffers[layer][:, :, at:at + new.size(2)]
        if rows is None:
            dst.copy_(new)
        else:
            dst.index_copy_(0, rows, new)
        return buffers[layer]

    def reorder(self, new_order) -> None:
        """Keep batch rows ``new_order`` (in that order): finished rows leave."""
        self.keys = [b.index_select(0, new_order) for b in self.keys]
        self.values = [b.index_select(0, new_order) for b in self.values]
        if self.pending is not None:
            self.pending = self.pending.index_select(0, new_order)
        self.batch = new_order.numel()


def block_diffusion_mask(length: int, block_size: int, padding_mask=None, device=None):
    """Attention mask (B or 1, 1, 2L, 2L), True where a query may attend to a key, over
    the noisy copy (positions 0..L-1) followed by the clean copy (L..2L-1): a noisy
    block sees itself and the clean blocks before it; a clean block sees the clean
    blocks up to itself; padding (``padding_mask`` (B, L), the same in both copies)
    is never a key, and every query sees itself (no empty row). A given
    ``padding_mask`` is applied without looking at it (None: no padding, see
    ``DiT.forward``); with no padding in it the mask is the same, only per row."""
    blk = torch.arange(length, device=device) // block_size
    same = blk[:, None] == blk[None, :]
    earlier = blk[:, None] > blk[None, :]
    keep = torch.cat([torch.cat([same, earlier], 1),
                      torch.cat([torch.zeros_like(same), same | earlier], 1)], 0)[None, None]
    if padding_mask is not None:
        keys = ~torch.cat([padding_mask, padding_mask], 1)
        keep = (keep & keys[:, None, None, :]) | torch.eye(2 * length, dtype=torch.bool,
                                                           device=device)
    return keep


def flex_attention_available(device) -> bool:
    """Whether block diffusion's training pass can use ``flex_attention`` on ``device``:
    the module imports (torch >= 2.5) and the device is CUDA (on CPU flex attention runs
    forward only, through a slow reference path, and has no backward)."""
    if torch.device(device).type != "cuda":
        return False
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


_COMPILED_FLEX = None


def _flex_attention(device):
    """flex_attention compiled once on CUDA (its fused kernels exist only under
    torch.compile; eager it materialises every score); inside a compiled block the
    plain function is traced into the block's graph instead; on CPU the eager reference
    (forward only: what the equality test with SDPA runs)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def block_diffusion_mask_mod(length: int, block_size: int):
    """:func:`block_diffusion_mask` without padding, as a flex-attention mask_mod over
    query/key indices of the 2L sequence (noisy copy, then clean copy)."""
    def mask_mod(b, h, q_idx, kv_idx):
        q_clean, k_clean = q_idx >= length, kv_idx >= length
        bq = (q_idx - q_clean * length) // block_size
        bk = (kv_idx - k_clean * length) // block_size
        noisy_q = ~q_clean & ((~k_clean & (bq == bk)) | (k_clean & (bq > bk)))
        clean_q = q_clean & k_clean & (bq >= bk)
        return noisy_q | clean_q
    return mask_mod


class FlexBlockMask:
    """Block diffusion's attention for ``flex_attention``: the block mask of (L, L') is
    built once per (L, L', device) and cached (it depends on neither the batch nor the
    tokens); padding keys are removed by a score_mod reading ``padding_mask`` (B, L), so
    the batch needs no mask of its own and the step no host-side test of the padding.
    As in the SDPA mask, every query keeps its own key (no empty row)."""

    _cache: Dict[tuple, object] = {}

    def __init__(self, length: int, block_size: int, padding_mask=None, device=None):
        key = (length, block_size, str(device))
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask
            self._cache[key] = create_block_mask(
                block_diffusion_mask_mod(length, block_size), None, None, 2 * length,
                2 * length, device=device)
        self.block_mask, self.length = self._cache[key], length
        self.keys = None if padding_mask is None else torch.cat([padding_mask, padding_mask], 1)

    def __call__(self, q, k, v):
        score_mod = None
        if self.keys is not None:
            pad = self.keys

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(pad[b, kv_idx] & (q_idx != kv_idx), -float("inf"), score)
        return _flex_attention(q.device)(q, k, v, score_mod=score_mod,
                                         block_mask=self.block_mask)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cond_dim: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.norm1 = LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim))
        self.adaLN = nn.Linear(cond_dim, 6 * dim)   # adaLN-Zero: zero-initialised
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x, c, cos, sin, attn_mask: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, layer: int = 0):
        """x (B, L, D); cos/sin of x's positions; attn_mask (B or 1, 1, L, T) bool,
        True where a query may attend to a key, or None (all keys, or causal), or an
        attention (q, k, v) -> output: a :class:`FlexBlockMask` (block diffusion through
        flex attention), or ``BlockKVCache.attention`` (block-diffusion sampling);
        with a cache, x holds the new positions only and T counts the cached ones."""
        B, L, D = x.shape
        mods = self.adaLN(c)                # c (B, C), or (B, L, C) per position
        mods = mods.unsqueeze(1) if mods.dim() == 2 else mods
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, -1)

        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # SDPA's is_causal aligns the mask top-left, right only without cached keys; a
        # single new query with cached keys may see them all
        if callable(attn_mask):
            a = attn_mask(q, k, v)
        else:
            a = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask,
                is_causal=self.causal and attn_mask is None and k.size(2) == L,
                dropout_p=0.0)
        a = self.attn_out(a.transpose(1, 2).reshape(B, L, D))
        x = torch.addcmul(x, gate1, F.dropout(a, self.dropout, self.training))

        h = modulate(self.norm2(x), shift2, scale2)
        x = torch.addcmul(x, gate2, F.dropout(self.mlp(h), self.dropout, self.training))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.adaLN = nn.Linear(cond_dim, 2 * dim)
        self.head = nn.Linear(dim, vocab_size)
        for lin in (self.adaLN, self.head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, c, rows=None):
        """x (B, L, D) with c (B or 1, C) or (B, L, C); or x (N, D) gathered positions
        of batch ``rows``, or with their own c (N, C)."""
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        if rows is not None:
            if shift.size(0) > 1:              # (1, D) broadcasts over the positions
                shift, scale = shift[rows], scale[rows]
        elif shift.dim() < x.dim():
            shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
        return self.head(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over token ids.

    forward(tokens, sigma=None, padding_mask=None, positions=None, cache=None):
      tokens (B, L) long; sigma (B,) noise level (used only with time conditioning);
      padding_mask (B, L) bool, True at padding (excluded as attention keys), or None
      for a batch without padding. Whether a batch has padding is the caller's to say
      (it knows from the host: fairseq's batch counts its tokens): a given mask is
      applied as is, without a host-side test of its contents (on a GPU that test
      would make the host wait for the device), and None lets attention run maskless
      (flash attention on a GPU). An all-False mask gives the outputs of None (up to
      the attention kernel's rounding); ``MDLMModel.padding_mask`` makes the choice
      for the fairseq models;
      positions (B, L) bool: if given, logits only for those positions, shape (N, V),
      row-major; else (B, L, V);
      cache: a :class:`KVCache` (causal models only): ``tokens`` are the positions
      after the cached ones, which are appended to it. Decoding a sequence in
      pieces through one cache gives the logits of the full causal forward.
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, cond_dim: int = 128,
                 dropout: float = 0.1, max_positions: int = 1024, causal: bool = False,
                 time_conditioning: bool = False, block_attention: str = "auto"):
        super().__init__()
        if block_attention not in BLOCK_ATTENTION:
            raise ValueError(f"block_attention must be one of {BLOCK_ATTENTION}, "
                             f"not {block_attention!r}")
        self.block_attention = block_attention
        if dim % heads != 0 or (dim // heads) % 2 != 0:
            raise ValueError(f"embed dim {dim} must be divisible by heads {heads} "
                             f"into an even head size")
        self.max_positions, self.causal = max_positions, causal
        self.time_conditioning = time_conditioning
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.kaiming_uniform_(self.embed.weight, a=math.sqrt(5))
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.rotary = Rotary(dim // heads)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, heads, cond_dim, dropout, causal) for _ in range(layers))
        self.final = FinalLayer(dim, vocab_size, cond_dim)
        self.dropout = dropout
        # a float buffer (fairseq's EMA averages every float state entry: -inf stays -inf)
        self.register_buffer("logit_mask", torch.zeros(vocab_size))

    def never_predict(self, symbols) -> None:
        """Give the logits of ``symbols`` (ids) -inf from now on (saved with the model)."""
        self.logit_mask[torch.as_tensor(list(symbols), dtype=torch.long)] = float("-inf")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before logit_mask existed: nothing is masked
        state_dict.setdefault(prefix + "logit_mask", torch.zeros_like(self.logit_mask))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def compile_blocks(self, **options):
        """Compile each DiT block in place (``nn.Module.compile``: parameter names and
        checkpoints unchanged) with ``torch.compile(**options)``. A block has no graph
        break (tests/test_compile.py); the code around the blocks (padding, gathering
        the masked positions) stays eager, so its data-dependent shapes cause no
        recompilation."""
        for block in self.blocks:
            block.compile(**options)
        return self

    def uses_flex(self, device) -> bool:
        """Whether ``forward_blocks`` runs its attention through flex attention."""
        if self.block_attention == "sdpa":
            return False
        if self.block_attention == "flex":
            return True
        return flex_attention_available(device)

    def condition(self, batch: int, sigma=None, device=None):
        """The adaLN conditioning vector: (B, C) from sigma with time conditioning, or
        (1, C), broadcast over the batch, when every row gets the same one (without
        time conditioning: a learned constant). A shared vector is computed once, so
        a row's output does not depend on the other rows of its batch (a matmul over
        B rows rounds differently for different B).

        A sigma is shared when its shape says so, read on the host without looking at
        the values: one element, or a (B,) view of one value (stride 0, what
        ``sigma.expand(B)`` gives; the samplers pass theirs so). A (B,) tensor that
        merely holds equal values is taken per row: same outputs up to rounding."""
        if sigma is None or not self.time_conditioning:
            sigma = torch.zeros(1, device=device)
        elif sigma.dim() == 1 and sigma.numel() > 1 and sigma.stride(0) == 0:
            sigma = sigma[:1]
        return F.silu(self.sigma_map(sigma))

    def hidden(self, tokens, sigma=None, padding_mask=None, cache: Optional[KVCache] = None):
        """Final hidden states (B, L, D) and the conditioning vector (B or 1, C)."""
        B, L = tokens.shape
        past = 0
        if cache is not None:
            if not self.causal:
                raise ValueError("a KV cache needs a causal model: bidirectional outputs "
                                 "change with every new token")
            if padding_mask is not None and bool(padding_mask.any()):
                raise ValueError("padding is not supported with a KV cache")
            past = cache.length
        if past + L > self.max_positions:
            raise ValueError(f"sequence length {past + L} exceeds the model's max_positions "
                             f"{self.max_positions}")
        c = self.condition(B, sigma, tokens.device)
        x = self.embed(tokens)
        cos, sin = self.rotary(L, x.device, x.dtype, offset=past)
        attn_mask = None
        if past > 0 and L > 1:
            # new query i sits at position past + i and sees keys 0 .. past + i
            attn_mask = torch.ones(L, past + L, dtype=torch.bool,
                                   device=x.device).tril(diagonal=past)
        elif padding_mask is not None:                  # applied without a host test
            keep = ~padding_mask[:, None, None, :]                      # (B,1,1,L)
            if self.causal:
                keep = keep & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            # a row whose keys are all padding would give NaN: let it see itself
            keep = keep | torch.eye(L, dtype=torch.bool, device=x.device)
            attn_mask = keep
        for i, block in enumerate(self.blocks):
            x = block(x, c, cos, sin, attn_mask, cache, i)
        return x, c

    def forward(self, tokens, sigma=None, padding_mask=None, positions=None,
                cache: Optional[KVCache] = None):
        x, c = self.hidden(tokens, sigma, padding_mask, cache)
        return self._head(x, c, positions)

    def _head(self, x, c, positions):
        """Logits (B, L, V), or (N, V) at ``positions``; c (B or 1, C) or (B, L, C)."""
        if positions is None:
            return self.final(x, c) + self.logit_mask
        return self.output_rows(x, c, positions).logits()

    def output_rows(self, x, c, positions, exclude=()) -> "OutputRows":
        """The output layer's input at ``positions`` (B, L) of the hidden states x
        (B, L, D), row-major, its logits computed on demand (:class:`OutputRows`);
        ``exclude``: symbols whose logits are -inf in this output only."""
        # The one device-to-host read of a training step, kept on purpose: the number of
        # masked positions, so that the output layer (the largest matmul with a big
        # vocabulary, and its fp32 logits) runs on them only (half the positions on
        # average) rather than on every position with a data-independent shape
        # (docs/gpu.md). One nonzero, then plain gathers: the bounds read the count off
        # the logits' shape and ask for nothing more.
        flat = positions.reshape(-1).nonzero().squeeze(1)
        row = torch.div(flat, positions.size(1), rounding_mode="floor")
        col = flat - row * positions.size(1)
        h, rows = x[row, col], None
        if c.dim() == 3:                       # per-position conditioning (block diffusion)
            c = c[row, col]
        else:
            rows = row
        return OutputRows(self, h, c, rows, exclude)

    def _output(self, h, c, rows):
        """Logits (N, V) of gathered hidden states h (N, D) (``FinalLayer`` with rows)."""
        n = h.size(0)
        if n < MIN_HEAD_ROWS:
            # a matmul over a few rows takes another kernel path than one over many and
            # rounds differently: padded, a position's logits do not depend on how many
            # other positions share the call (the cached sampler relies on it)
            h = F.pad(h, (0, 0, 0, MIN_HEAD_ROWS - n))
            if rows is None:
                c = F.pad(c, (0, 0, 0, MIN_HEAD_ROWS - n))
            else:
                rows = F.pad(rows, (0, MIN_HEAD_ROWS - n))
        return self.final(h, c, rows)[:n] + self.logit_mask

    def forward_blocks(self, z_t, x, block_size: int, sigma=None, padding_mask=None,
                       positions=None):
        """Block diffusion's training pass: the noisy copy ``z_t`` (B, L) followed by
        the clean copy ``x`` (B, L) as one sequence of 2L positions (both copies at
        rotary positions 0..L-1) under :func:`block_diffusion_mask`; returns the
        noisy copy's logits as ``forward`` does. ``sigma`` (B,) or (B, L) per token
        is read with time conditioning (the clean copy is conditioned on 0). The
        attention is flex attention with a cached block mask where ``uses_flex`` (CUDA,
        or ``block_attention="flex"``), else SDPA with a dense mask."""
        B, L = x.shape
        if L > self.max_positions:
            raise ValueError(f"sequence length {L} exceeds the model's max_positions "
                             f"{self.max_positions}")
        h = self.embed(torch.cat([z_t, x], 1))
        cos, sin = self.rotary(L, h.device, h.dtype)
        cos, sin = cos.repeat(2, 1), sin.repeat(2, 1)
        if self.time_conditioning and sigma is not None:
            sigma = sigma if sigma.dim() == 2 else sigma.unsqueeze(1).expand(B, L)
            c = self.condition(B, torch.cat([sigma, torch.zeros_like(sigma)], 1), h.device)
        else:
            c = self.condition(B, None, h.device)
        if self.uses_flex(h.device):
            mask = FlexBlockMask(L, block_size, padding_mask, h.device)
        else:
            mask = block_diffusion_mask(L, block_size, padding_mask, h.device)
        for i, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, mask)
        return self._head(h[:, :L], c[:, :L] if c.dim() == 3 else c, positions)

    def block_step(self, tokens, cache: BlockKVCache, sigma=None, positions=None,
                   rows=None, commit: bool = False):
        """One block of block-diffusion sampling, at ``cache.position``.

        commit=False: logits (as ``forward``) of the noisy block ``tokens`` (b, L') of
        the cache rows ``rows`` (``block_hidden``).
        commit=True: the clean block ``tokens`` (B, L') of every row joins the cache
        (conditioned on sigma = 0, as the clean copy in training) and the position
        advances; it runs through the network with the next noisy block, or alone
        (``BlockKVCache``)."""
        if commit:
            if cache.pending is not None:
                self._block_pass(cache, cache.pending, None)
            cache.defer(tokens)
            return None
        return self._head(*self.block_hidden(tokens, cache, sigma, rows), positions)

    def block_hidden(self, tokens, cache: BlockKVCache, sigma=None, rows=None):
        """Final hidden states (b, L', D) and conditioning vector of the noisy block
        ``tokens`` (b, L') of the cache rows ``rows`` (sorted, unique; all when None),
        attending to their committed blocks and to the whole block (``output_rows``
        turns them into logits). A pending commit runs in the same pass when the cache
        fuses, the pass is over every row and one conditioning vector serves both blocks
        (no time conditioning); else alone, first."""
        clean = cache.pending
        if clean is not None and not (cache.fuse and not self.time_conditioning and
                                      (rows is None or rows.numel() == clean.size(0))):
            self._block_pass(cache, clean, None)
            clean = None
        return self._block_pass(cache, clean, tokens, sigma, None if clean is not None else rows)

    def _block_pass(self, cache: BlockKVCache, clean, noisy, sigma=None, rows=None):
        """One pass of the pending block ``clean`` and/or the noisy block ``noisy``, in
        that order along the sequence; the noisy block's hidden states and c."""
        x = clean if noisy is None else noisy if clean is None else torch.cat([clean, noisy], 1)
        n_clean = 0 if clean is None else clean.size(1)
        h = self.embed(x)
        start = cache.begin(n_clean, x.size(1) - n_clean, rows)
        cos, sin = self.rotary(x.size(1), h.device, h.dtype, offset=start)
        c = self.condition(x.size(0), None if noisy is None else sigma, h.device)
        for i, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, cache.attention(i))
        cache.end()
        return h[:, n_clean:], c


class OutputRows:
    """The output layer's input at N gathered positions, its logits computed only for
    the positions asked for (``diffusion.samplers.DeferredLogits``): hidden states h
    (N, D), and c (N, C) per position, or c (B or 1, C) with each position's batch row
    ``rows`` (N,). A position's logits are the same whichever others share the call
    (``DiT._output`` pads small calls); ``exclude``: symbols given -inf."""

    def __init__(self, model: DiT, h, c, rows=None, exclude=()):
        self.model, self.h, self.c, self.rows, self.exclude = model, h, c, rows, list(exclude)

    def __len__(self) -> int:
        return self.h.size(0)

    def logits(self, index=None):
        h, c, rows = self.h, self.c, self.rows
        if index is not None:
            h = h.index_select(0, index)
            if rows is None:
                c = c.index_select(0, index)
            else:
                rows = rows.index_select(0, index)
        logits = self.model._output(h, c, rows)
        if self.exclude:
            logits[:, self.exclude] = float("-inf")
        return logits
