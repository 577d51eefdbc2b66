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


def _criterion_loss(model, task, sample, dtype):
    """The fairseq criterion's loss (evaluation mode: seeded times and masks, so each
    precision sees the same draw) with the model's weights cast to ``dtype``."""
    from mdlm_plugin.criterions.mdlm import MDLMCriterion
    with torch.no_grad():
        loss, ntokens, log = MDLMCriterion(task)(copy.deepcopy(model).to(dtype).eval(), sample)
    return loss, ntokens, log


def test_criterion_loss_agrees_fp32_vs_half_weights(ptb_tiny, trained_tiny):
    """Through fairseq: a trained checkpoint, a real test batch and the mdlm criterion.
    fp16 (what --fp16 runs) and bf16 (--bf16) weights give the fp32 loss within 0.2% and
    0.5% (measured: 2e-5 and 4e-5): the logits are cast to fp32 before the log-softmax
    and the weighted sum."""
    from fairseq import checkpoint_utils
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(trained_tiny[0] / "checkpoint_best.pt")], arg_overrides={"data": str(ptb_tiny)})
    task.load_dataset("test")
    batches = task.get_batch_iterator(task.dataset("test"), max_sentences=32).next_epoch_itr(
        shuffle=False)
    sample = next(iter(batches))
    ref, ntokens, log = _criterion_loss(models[0], task, sample, torch.float32)
    assert log["nmasked"] > 100
    for dtype, rel in ((torch.float16, 2e-3), (torch.bfloat16, 5e-3)):
        loss, n, _ = _criterion_loss(models[0], task, sample, dtype)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and n == ntokens
        print(f"{dtype}: loss {loss.item() / n:.4f} vs fp32 {ref.item() / n:.4f} nats/token")
        assert loss.item() == pytest.approx(ref.item(), rel=rel)


BF16_CONFIG = """
common: {seed: 1, cpu: true, bf16: true, log_format: json, log_interval: 1}
checkpoint: {no_epoch_checkpoints: true}
dataset: {batch_size: 4, disable_validation: true, num_workers: 0}
task: {_name: masked_diffusion, tokens_per_sample: 32}
criterion: {_name: mdlm}
model: {_name: mdlm, embed_dim: 64, layers: 2, attention_heads: 2, cond_dim: 32}
optimizer: {_name: adam}
optimization: {lr: [0.003], max_update: 4}
lr_scheduler: {_name: fixed}
"""


def test_bf16_training_on_cpu_through_fairseq_hydra_train(ptb_tiny, tmp_path):
    """fairseq-train --bf16 means --tpu (it needs torch_xla); fairseq-hydra-train with
    common.bf16=true keeps the CPU device: bf16 weights, fp32 master copies
    (FP16Optimizer). Every logged loss and gradient norm is finite."""
    import json
    import math
    from conftest import USER_DIR, fairseq_cli
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "bf16.yaml").write_text(BF16_CONFIG)
    save = tmp_path / "ckpt"
    proc = fairseq_cli(
        "hydra_train", "--config-dir", tmp_path / "conf", "--config-name", "bf16",
        f"+task.data={ptb_tiny}", f"common.user_dir={USER_DIR}", f"checkpoint.save_dir={save}",
        f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    text = proc.stdout + proc.stderr
    steps = [json.loads(line[line.index("{"):]) for line in text.splitlines()
             if "[train_inner]" in line]
    assert [int(s["num_updates"]) for s in steps] == [1, 2, 3, 4], text[-2000:]
    for s in steps:
        assert math.isfinite(float(s["loss"])) and math.isfinite(float(s["gnorm"])), s
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["cfg"]["common"]["bf16"] and not ckpt["cfg"]["common"]["tpu"]
    assert ckpt["cfg"]["model"]["embed_dim"] == 64
    assert ckpt["optimizer_history"][-1]["optimizer_name"] == "FP16Optimizer"
