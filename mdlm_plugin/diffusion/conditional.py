"""Conditional masked diffusion (source -> target) as a prefix model. Pure torch.

One bidirectional denoiser reads ``[target canvas ; source]``: the canvas is a fixed
number C of positions holding the target, its ``</s>``, and ``</s>`` again up to C;
the source tokens (ending in ``</s>``, as fairseq-preprocess writes them) follow it.
The canvas comes first so that target position j is position j whatever the source
length, and source token i sits at C + i: a constant offset, which rotary attention
reads directly. The canvas is the sequence the diffusion models: the filler is a
deterministic function of the target, so p(canvas | source) = p(target | source),
and the model learns where the target ends the way it learns any token. A sampled
canvas is read up to its first ``</s>``.

The bound and the samplers need nothing new: the source is just given tokens. For
the bound they are left out like padding (``objective.nelbo``'s ``pad_mask``: never
masked, never scored); for the samplers ``[<mask> x C ; source]`` is an infilling
template (a token that is not ``<mask>`` is given and never changes). Rows are
right-padded after the source.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class ConditionalInputError(ValueError):
    """A source or target that does not fit; the message says which and by how much."""


def canvas_of(target: torch.Tensor, canvas: int, eos: int) -> torch.Tensor:
    """The canvas of a target (1-D, ending in ``eos``): the target, then ``eos`` up to
    ``canvas`` positions."""
    n = target.numel()
    if n > canvas:
        raise ConditionalInputError(
            f"a target has {n} tokens (with </s>), more than the canvas of {canvas}")
    if n == 0 or int(target[-1]) != eos:
        raise ConditionalInputError("a target must end with </s>")
    return torch.cat([target, target.new_full((canvas - n,), eos)])


def join(sources: Sequence[torch.Tensor], canvases: Sequence[torch.Tensor], pad: int,
         max_positions: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[canvas ; source]`` per row, right-padded with ``pad``: returns ``x`` (B, L)
    and ``given`` (B, L), True at the source positions."""
    rows = [torch.cat([c.long(), s.long()]) for s, c in zip(sources, canvases)]
    L = max(r.numel() for r in rows)
    if max_positions is not None and L > max_positions:
        longest = max(s.numel() for s in sources)
        raise ConditionalInputError(
            f"a source of {longest} tokens and a target canvas of {canvases[0].numel()} "
            f"need {L} positions; the model has {max_positions}")
    x = rows[0].new_full((len(rows), L), pad)
    given = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for k, (c, r) in enumerate(zip(canvases, rows)):
        x[k, :r.numel()] = r
        given[k, c.numel():r.numel()] = True
    return x, given


def training_input(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                   canvas: int, eos: int, pad: int, max_positions: Optional[int] = None):
    """(x, not_scored) for ``objective.nelbo``: x = [canvas of the target ; source],
    not_scored = the source and the padding (pass it as ``pad_mask``)."""
    x, given = join(sources, [canvas_of(t, canvas, eos) for t in targets], pad, max_positions)
    return x, given | x.eq(pad)


def read_canvas(tokens: torch.Tensor, canvas: int, eos: int) -> int:
    """Where the text of a sampled row (1-D ``[canvas ; source ; pad]``) ends: the
    number of canvas tokens up to and including the first ``eos`` (the whole canvas
    when it has none)."""
    ends = (tokens[:canvas] == eos).nonzero()
    return int(ends[0]) + 1 if ends.numel() else canvas


def strip_padding(rows: torch.Tensor, pad: int) -> List[torch.Tensor]:
    """The rows of a (B, L) batch without ``pad`` (left or right padded)."""
    return [r[r != pad] for r in rows]
