"""fairseq-generate / fairseq-interactive for block-diffusion models (``--block-size``):
the part of ``generator.py`` that only block models use.

Each hypothesis is sampled block by block with ``diffusion.blocks.sample_blocks``:
a prompt's tokens are given tokens of the first blocks, the committed blocks are
run once into the model's key/value cache (``MDLMModel.block_context``), each new
block is filled by ``--sampler`` in ``--steps`` steps. A prompt is continued to
``--gen-length`` tokens (any length: the cache slides, keeping the keys and values
of the last window - L' positions); ``--stop-at-eos`` ends a continuation at
the first ``</s>`` it generates, so lengths vary. An infilling template keeps its
length, its blocks sampled left to right.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .diffusion.blocks import sample_blocks
from .errors import MDLMUserError


def check_block_options(block_size: Optional[int], *, semi_ar_stride: int,
                        retain_history: bool, stop_at_eos: bool) -> None:
    """One clear error for a generation flag that does not fit the model."""
    if block_size is None:
        if stop_at_eos:
            raise MDLMUserError("--stop-at-eos needs a block-diffusion model (trained with "
                                "--block-size): an MDLM sample has a fixed length")
        return
    if semi_ar_stride:
        raise MDLMUserError("--semi-ar-stride does not apply to a block-diffusion model: "
                            "it samples block by block, any --gen-length, with a cache")
    if retain_history:
        raise MDLMUserError("--retain-iter-history is not available for block-diffusion "
                            "models (each block has its own trajectory)")


def generate_block_rows(gen, rows: List, calls: List[int]) -> None:
    """Fill ``tokens``, ``scores`` and ``steps`` of the generator's rows (``_Row``)
    with one ``sample_blocks`` run per group of rows of the same kind and length."""
    groups = {}
    for r in rows:
        z = r.prompt
        if not r.template:
            z = torch.cat([z, z.new_full((gen.gen_length - z.numel(),), gen.mask_index)])
        groups.setdefault((r.template, z.numel()), []).append((r, z))
    for (template, _), group in sorted(groups.items()):
        context = gen.model.block_context(gen.window, exclude=(gen.pad,))
        stop = gen.eos if gen.stop_at_eos and not template else None
        out = sample_blocks(context, torch.stack([z for _, z in group]), gen.block_size,
                            gen.config, gen.schedule, gen.mask_index, generator=gen._rng,
                            stop_token=stop)
        calls[0] += out.network_calls
        calls[1] += out.row_calls
        for k, (r, _) in enumerate(group):
            n = int(out.lengths[k])
            r.tokens, r.scores, r.steps = out.tokens[k, :n], out.scores[k, :n], out.steps
