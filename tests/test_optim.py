"""--optimizer adamw_torch: torch's AdamW (fused/foreach) makes the updates of
fairseq's adam, and its implementations agree with each other."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL, USER_DIR, fairseq_cli
from mdlm_plugin.optim.adamw_torch import AdamWTorch, AdamWTorchConfig, choose_impl


def _train(data, save_dir, optimizer):
    proc = fairseq_cli("train", data, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                "--criterion", "mdlm", *TINY_MODEL, "--batch-size", "8", "--cpu",
                "--lr", "3e-3", "--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-16",
                "--weight-decay", "0.1", "--max-update", "5", "--save-interval-updates", "1",
                "--seed", "11", "--disable-validation", "--no-epoch-checkpoints",
                "--num-workers", "0", "--save-dir", save_dir, "--optimizer", optimizer)
    return (lambda k: torch.load(save_dir / f"checkpoint_1_{k}.pt", map_location="cpu",
                                 weights_only=False)["model"]), proc.stdout + proc.stderr


def test_same_parameters_as_fairseq_adam(ptb_tiny, tmp_path):
    """Same betas, decoupled weight decay and bias corrections. eps is tiny here: fairseq's
    own adam adds it before the bias correction of v, torch (and apex) after, which
    matters where |grad| is near eps, as in the first updates of a zero-initialised
    (adaLN-Zero) model; with the default 1e-8 parameters differ by up to ~2 x lr there."""
    adam, _ = _train(ptb_tiny, tmp_path / "adam", "adam")
    adamw, log = _train(ptb_tiny, tmp_path / "adamw", "adamw_torch")
    assert "foreach implementation (--adamw-impl auto)" in log
    for k in (1, 3, 5):
        ref, new = adam(k), adamw(k)
        diff = max((ref[n].double() - new[n].double()).abs().max().item() for n in ref)
        print(f"adamw_torch vs fairseq adam after {k} updates: max |param difference| "
              f"= {diff:.3g}")
        for n in ref:
            torch.testing.assert_close(new[n], ref[n], rtol=1e-4, atol=1e-5)
    first, last = adam(1), adam(5)
    moved = max((last[n].double() - first[n].double()).abs().max().item() for n in last)
    assert moved > 100 * max(diff, 1e-7)        # 4 updates move far more than the gap


def _optimizer(impl, params, **over):
    cfg = OmegaConf.structured(AdamWTorchConfig(adamw_impl=impl, lr=[1e-2],
                                                adam_betas="(0.9, 0.98)", weight_decay=0.05,
                                                **over))
    return AdamWTorch(cfg, params)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _run(impl, steps=5):
    model = _model()
    opt = _optimizer(impl, model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 16, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
    return model.state_dict(), opt


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_implementations_agree_on_cpu(impl):
    ref, opt_ref = _run("for")
    got, opt = _run(impl)
    assert opt.impl == impl and opt_ref.impl == "for"
    group = opt.optimizer.param_groups[0]
    assert group["foreach"] == (impl == "foreach") and group["fused"] == (impl == "fused")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)
    init = _model().state_dict()
    assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 1e-2


def test_auto_picks_fused_on_cuda_and_foreach_on_cpu():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert choose_impl("auto", cpu) == "foreach"
    assert choose_impl("for", cpu) == "for"

    class FakeCuda:
        is_cuda = True
    assert choose_impl("auto", [FakeCuda(), FakeCuda()]) == "fused"
    assert choose_impl("auto", [FakeCuda(), cpu[0]]) == "foreach"


def test_checkpoint_state_loads_under_another_impl():
    """A foreach run's optimizer state resumes under --adamw-impl for, and the flag,
    not the checkpoint, decides the kernel."""
    _, opt = _run("foreach", steps=3)
    model = _model()
    other = _optimizer("for", model.parameters())
    other.load_state_dict(opt.state_dict(), optimizer_overrides=other.optimizer_config)
    group = other.optimizer.param_groups[0]
    assert group["foreach"] is False and group["fused"] is False
    assert int(other.optimizer.state[next(iter(model.parameters()))]["step"]) == 3
