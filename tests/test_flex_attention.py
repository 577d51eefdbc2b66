"""Block diffusion's 2L training pass through flex attention (cached block mask, padding
by score_mod) against the SDPA path (dense boolean mask).

torch 2.13 runs flex attention on CPU forward only (its backward raises
NotImplementedError on CPU), through the eager reference path: the equality is checked
here without gradients; ``auto`` selects flex on CUDA only, so CPU training keeps SDPA.
On a GPU the same comparison with gradients runs in benchmarks/gpu_check.py (BD3 flex
vs SDPA training rows) and in this test's CUDA case when a device is present."""
import pytest
import torch

from mdlm_plugin.models.backbone import DiT, FlexBlockMask, block_diffusion_mask

VOCAB, L, BLOCK = 40, 16, 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def nets(device):
    torch.manual_seed(0)
    flex = DiT(VOCAB, 32, 2, 2, cond_dim=16, dropout=0.0, max_positions=64,
               block_attention="flex").to(device)
    with torch.no_grad():      # the head starts at zero: make the logits carry the attention
        for p in flex.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sdpa = DiT(VOCAB, 32, 2, 2, cond_dim=16, dropout=0.0, max_positions=64,
               block_attention="sdpa").to(device)
    sdpa.load_state_dict(flex.state_dict())
    return flex, sdpa


@pytest.mark.parametrize("device", DEVICES)
def test_flex_equals_sdpa_with_padding(device):
    flex, sdpa = nets(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, VOCAB, (3, L), generator=g).to(device)
    z = x.masked_fill(torch.rand(3, L, generator=g).to(device) < 0.5, VOCAB - 1)
    pad = torch.zeros(3, L, dtype=torch.bool, device=device)
    pad[1, 10:] = True          # a partly padded row (ends inside block 2)
    pad[2, 4:] = True           # a row of one unpadded block
    assert flex.uses_flex(device) and not sdpa.uses_flex(device)
    grad = device == "cuda"     # flex attention has no backward on CPU
    with torch.set_grad_enabled(grad):
        a = flex.forward_blocks(z, x, BLOCK, padding_mask=pad)
        b = sdpa.forward_blocks(z, x, BLOCK, padding_mask=pad)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a0 = flex.forward_blocks(z, x, BLOCK)
        torch.testing.assert_close(a0, sdpa.forward_blocks(z, x, BLOCK), rtol=1e-5, atol=1e-5)
        # padding changes the padded rows only
        assert not torch.allclose(a[1], a0[1]) and torch.allclose(a[0], a0[0], atol=1e-6)
    if grad:
        a.square().sum().backward()
        b.square().sum().backward()
        for (name, p), q in zip(flex.named_parameters(), sdpa.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_block_mask_is_built_once_per_length_and_block_size():
    m1 = FlexBlockMask(L, BLOCK, device="cpu")
    m2 = FlexBlockMask(L, BLOCK, torch.zeros(2, L, dtype=torch.bool), device="cpu")
    assert m1.block_mask is m2.block_mask
    assert FlexBlockMask(L, 8, device="cpu").block_mask is not m1.block_mask
    # the cached mask is block_diffusion_mask without padding
    q = torch.arange(2 * L)[:, None]
    k = torch.arange(2 * L)[None, :]
    from mdlm_plugin.models.backbone import block_diffusion_mask_mod
    keep = block_diffusion_mask_mod(L, BLOCK)(0, 0, q, k)
    assert torch.equal(keep, block_diffusion_mask(L, BLOCK)[0, 0])


def test_auto_uses_sdpa_on_cpu():
    net = DiT(VOCAB, 32, 2, 2, max_positions=64)
    assert net.block_attention == "auto" and not net.uses_flex("cpu")
    with pytest.raises(ValueError, match="block_attention"):
        DiT(VOCAB, 32, 2, 2, block_attention="xformers")
