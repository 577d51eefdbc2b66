"""torch.compile of the DiT blocks (``--compile-blocks``): no graph break inside a block,
the breaks outside the blocks listed, and the compiled model's loss and gradients equal
to the eager model's.

The equality runs under the ``aot_eager`` backend: it traces forward and backward through
dynamo and AOTAutograd exactly as inductor does, but runs the traced graphs with the eager
kernels; inductor's C++ code generation costs minutes per graph on a loaded 2-core machine.
Inductor's speed is measured in benchmarks/train_throughput.py (docs/gpu.md)."""
import torch
import torch.nn.functional as F

from mdlm_plugin.models.backbone import DiT

VOCAB, L = 40, 16


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return DiT(VOCAB, 32, 2, 2, cond_dim=16, dropout=0.0, max_positions=64, **kw)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (3, L), generator=g)
    pad = torch.zeros(3, L, dtype=torch.bool)
    pad[1, 11:] = True
    masked = (torch.rand(3, L, generator=g) < 0.5) & ~pad
    return x, pad, masked


def block_inputs(net, x, pad):
    h = net.embed(x)
    c = net.condition(x.size(0))
    cos, sin = net.rotary(x.size(1), h.device, h.dtype)
    keep = ~pad[:, None, None, :] | torch.eye(x.size(1), dtype=torch.bool)
    return h, c, cos, sin, keep


def test_a_block_has_no_graph_break():
    net = tiny()
    x, pad, _ = batch()
    h, c, cos, sin, keep = block_inputs(net, x, pad)
    for mask in (None, keep):
        torch._dynamo.reset()
        e = torch._dynamo.explain(net.blocks[0])(h, c, cos, sin, mask)
        assert e.graph_break_count == 0, e.break_reasons
        assert e.graph_count == 1


def loss_and_grads(net, x, pad, masked):
    net.zero_grad()
    logits = net(x.masked_fill(masked, VOCAB - 1), padding_mask=pad, positions=masked)
    loss = F.cross_entropy(logits, x[masked])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                           if p.grad is not None}


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    x, pad, masked = batch()
    eager = tiny()
    compiled = tiny().compile_blocks(backend="aot_eager", fullgraph=True)
    # compiled in place: parameter names (hence checkpoints) unchanged
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    # adaLN and the head start at zero: perturb them so every path carries a gradient
    with torch.no_grad():
        for a, b in zip(eager.parameters(), compiled.parameters()):
            a.add_(0.05 * torch.randn_like(a))
            b.copy_(a)
    torch._dynamo.reset()
    l_eager, g_eager = loss_and_grads(eager, x, pad, masked)
    l_comp, g_comp = loss_and_grads(compiled, x, pad, masked)
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-5)
    assert g_comp.keys() == g_eager.keys() and len(g_eager) == len(list(eager.parameters()))
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-5, atol=1e-5,
                                   msg=name)


def test_graph_breaks_outside_the_blocks_are_listed():
    """The whole forward breaks at exactly one line, outside the blocks: the ``nonzero``
    of the masked positions in ``DiT.output_rows`` (a data-dependent shape, so that the output
    layer runs on the masked positions only: the largest matmul with a big vocabulary).
    Padding (a given mask is applied without a host test) and a per-row sigma (shared
    or not is read off its shape) break nothing, with and without time conditioning.
    With ``--compile-blocks`` the line stays eager, between the compiled blocks."""
    x, pad, masked = batch()
    sigma = torch.tensor([0.5, 1.0, 2.0])
    for net in (tiny(), tiny(time_conditioning=True)):
        torch._dynamo.reset()
        e = torch._dynamo.explain(net)(x, sigma, padding_mask=pad, positions=masked)
        where = {(b.user_stack[-1].name, b.user_stack[-1].line.strip())
                 for b in e.break_reasons}
        assert where == {("output_rows", "flat = positions.reshape(-1).nonzero().squeeze(1)")}, where
