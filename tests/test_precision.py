"""Mixed precision: the loss stays fp32 in log space, agrees with fp32, no inf/nan."""
import copy

import pytest
import torch

from mdlm_plugin.diffusion.objective import nelbo
from mdlm_plugin.diffusion.schedules import build_schedule
from mdlm_plugin.models.backbone import DiT

V, L, MASK = 50, 16, 50


def _model():
    torch.manual_seed(0)
    m = DiT(V + 1, dim=64, layers=2, heads=4, cond_dim=32, dropout=0.0, max_positions=L)
    for p in m.parameters():       # move off the zero init so the outputs are non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def _bound(model, x, t=None, autocast_dtype=None):
    den = lambda z, s, p: model(z, sigma=s, positions=p)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        return nelbo(den, x, build_schedule("loglinear"), MASK, generator=g, t=t)


@pytest.mark.parametrize("mode", ["fp16_weights", "bf16_autocast"])
def test_half_precision_loss_is_fp32_and_agrees(mode):
    x = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(1))
    ref = _bound(_model(), x)
    if mode == "fp16_weights":      # what --fp16 does: model.half()
        half = _bound(copy.deepcopy(_model()).half(), x)
    else:                           # what --amp does: autocast around the forward
        half = _bound(_model(), x, autocast_dtype=torch.bfloat16)
    assert half.loss.dtype == torch.float32
    assert torch.isfinite(half.loss)
    assert half.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)


def test_no_overflow_at_the_smallest_time():
    """t = eps gives weights near 1/eps = 1000; fp16 logits must not overflow the loss."""
    model = copy.deepcopy(_model()).half()
    x = torch.randint(0, V, (256, L), generator=torch.Generator().manual_seed(2))
    terms = _bound(model, x, t=torch.full((256,), 1e-3))
    assert terms.n_masked > 0            # 256 x 16 tokens at t = eps: about 4 masked
    assert torch.isfinite(terms.per_sequence).all() and torch.isfinite(terms.loss)
    assert terms.loss.dtype == torch.float32
