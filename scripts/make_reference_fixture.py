"""Make tests/fixtures/reference/ once, from the REFERENCE code (not run in CI).

Runs the authors' networks and loss code on tiny random models and records what
they compute, so tests/test_convert.py can check our converted models against the
reference itself, not against ourselves:

* ``mdlm.ckpt``: a Lightning checkpoint as kuleshov-group/mdlm's ``Diffusion`` saves
  it (``state_dict`` of ``backbone.*`` tensors, ``ema`` with ``shadow_params`` in
  parameter order, ``hyper_parameters`` with the hydra ``config`` and the pickled
  tokenizer), MDLM without time conditioning;
* ``mdlm_tc_hf/``: the Hugging Face layout (``config.json`` + ``model.safetensors``)
  of an MDLM with time conditioning;
* ``bd3lm.ckpt``: a Lightning checkpoint as kuleshov-group/bd3lms saves it, a BD3-LM
  with blocks of 2 tokens (its sdpa attention backend: the block-causal mask over
  [x_t, x_0]);
* ``expected.pt`` (tensors and strings only): the inputs x_0, the reference's own
  draws of t and x_t, its logits (EMA and raw weights for mdlm.ckpt), its per-token
  loss and NELBO, and ``record``: repositories, commits, this command, the shim.

Usage (reference checkouts at the recorded commits, e.g. ``git archive``;
einops, huggingface_hub, omegaconf and safetensors importable)::

    python scripts/make_reference_fixture.py --mdlm REF_MDLM --mdlm-commit C1 \
        --bd3lms REF_BD3LMS --bd3lms-commit C2 --out tests/fixtures/reference

The reference's ``diffusion.py`` imports lightning, hydra, transformers and its data
code at module level; the loss methods used here (``_forward_pass_diffusion``,
``_subs_parameterization``, ``forward``, ``_process_sigma``, ``q_xt``,
``_sample_t``, ``_sigma_from_p``) are taken from that file's syntax tree verbatim
and bound to a small stand-in object carrying the attributes they read.

flash_attn shim (mdlm's ``models/dit.py`` imports it unconditionally; there is no
CUDA here): ``apply_rotary_emb_qkv_`` rotates q and k in place in flash_attn's
default non-interleaved (rotate-half) form with the cos/sin the reference passes,
v untouched; ``flash_attn_varlen_qkvpacked_func(causal=False)`` is softmax
attention per sequence (``cu_seqlens``) with scale 1/sqrt(head_dim), no dropout.
That is what the GPU kernels compute (up to rounding). The reference runs its
blocks under ``torch.cuda.amp.autocast(bfloat16)``, which is inactive on CPU
tensors: the fixture is fp32 throughout. bd3lms needs no shim (its ``sdpa``
backend is plain torch).
"""
import argparse
import ast
import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

V, DIM, HEADS, LAYERS, COND, LENGTH, BATCH, BLOCK = 40, 16, 2, 2, 8, 8, 2, 2


def install_flash_attn_shim():
    def apply_rotary_emb_qkv_(qkv, cos, sin, *args, **kwargs):
        # qkv (B, S, 3, H, D); cos, sin (S, D/2); rotate q and k, not v
        half = cos.shape[-1]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        for i in (0, 1):
            x1, x2 = qkv[:, :, i, :, :half].clone(), qkv[:, :, i, :, half:2 * half].clone()
            qkv[:, :, i, :, :half] = x1 * c - x2 * s
            qkv[:, :, i, :, half:2 * half] = x1 * s + x2 * c
        return qkv

    def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                         causal=False, **kwargs):
        assert dropout_p == 0.0 and not causal
        out = torch.empty_like(qkv[:, 0])
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            q, k, v = (qkv[a:b, i].transpose(0, 1) for i in range(3))   # (H, S, D)
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            out[a:b] = (w @ v).transpose(0, 1)
        return out

    fa = types.ModuleType("flash_attn")
    layers = types.ModuleType("flash_attn.layers")
    rotary = types.ModuleType("flash_attn.layers.rotary")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    rotary.apply_rotary_emb_qkv_ = apply_rotary_emb_qkv_
    interface.flash_attn_varlen_qkvpacked_func = flash_attn_varlen_qkvpacked_func
    fa.layers, layers.rotary, fa.flash_attn_interface = layers, rotary, interface
    sys.modules.update({"flash_attn": fa, "flash_attn.layers": layers,
                        "flash_attn.layers.rotary": rotary,
                        "flash_attn.flash_attn_interface": interface})


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_methods(diffusion_py, names):
    """The named methods of class Diffusion in the reference's diffusion.py, compiled
    from its source as written (decorators dropped)."""
    tree = ast.parse(open(diffusion_py).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Diffusion")
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {f.name for f in funcs} == set(names), names
    for f in funcs:
        f.decorator_list = []
    namespace = {"torch": torch, "np": np, "F": F, "math": math,
                 "utils": types.SimpleNamespace(print_nans=lambda *a, **k: None)}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), diffusion_py, "exec"), namespace)
    return {n: namespace[n] for n in names}


class Stand(types.SimpleNamespace):
    """The attributes of a reference Diffusion module its loss methods read."""


def bind(obj, methods):
    for name, fn in methods.items():
        setattr(obj, name, types.MethodType(fn, obj))
    return obj


def randomize(module, gen, scale=0.3):
    """Every parameter random (the reference zero-initialises adaLN and the head)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1.0 + 0.1 * noise / scale if name.endswith("norm1.weight")
                    or name.endswith("norm2.weight") or name.endswith("norm_final.weight")
                    else noise)


def record_draws(stand):
    """Wrap the bound q_xt and _sample_t so their draws are kept."""
    draws = {}
    q_xt, sample_t = stand.q_xt, stand._sample_t

    def q_xt_rec(*a, **k):
        draws["xt"] = q_xt(*a, **k).clone()
        return draws["xt"]

    def sample_t_rec(*a, **k):
        draws["t"] = sample_t(*a, **k).clone()
        return draws["t"]

    stand.q_xt, stand._sample_t = q_xt_rec, sample_t_rec
    return draws


class GPT2TokenizerFast:
    """Stands for the tokenizer Lightning pickles into hyper_parameters (transformers
    is not installed here); the converter must load checkpoints holding one."""

    def __init__(self):
        self.name_or_path, self.vocab_size = "gpt2", V - 1


def pickled_as(cls, module):
    cls.__module__ = module
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[module].__dict__[cls.__name__] = cls
    return cls


def mdlm_case(ref, time_conditioning, gen, x0, seed, with_ema):
    from omegaconf import OmegaConf

    dit = load_module(os.path.join(ref, "models", "dit.py"), "ref_mdlm_dit")
    noise = load_module(os.path.join(ref, "noise_schedule.py"), "ref_mdlm_noise")
    cfg = OmegaConf.create({
        "mode": "train", "diffusion": "absorbing_state", "backbone": "dit",
        "parameterization": "subs", "time_conditioning": time_conditioning, "T": 0,
        "subs_masking": False,
        "model": {"name": "fixture", "type": "ddit", "hidden_size": DIM, "cond_dim": COND,
                  "length": LENGTH, "n_blocks": LAYERS, "n_heads": HEADS,
                  "scale_by_sigma": True, "dropout": 0.1, "tie_word_embeddings": False},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "training": {"ema": 0.9999 if with_ema else 0, "antithetic_sampling": True,
                     "importance_sampling": False, "sampling_eps": 1e-3,
                     "change_of_variables": False}})
    backbone = dit.DIT(cfg, vocab_size=V).eval()
    randomize(backbone, gen)
    raw = [p.detach().clone() for p in backbone.parameters()]
    ema = [p + 0.05 * torch.randn(p.shape, generator=gen) for p in raw] if with_ema else None
    stand = Stand(backbone=backbone, noise=noise.LogLinearNoise(), mask_index=V - 1,
                  neg_infinity=-1000000.0, time_conditioning=time_conditioning, T=0,
                  parameterization="subs", change_of_variables=False,
                  importance_sampling=False, antithetic_sampling=True,
                  sampling_eps=1e-3, config=cfg)
    bind(stand, reference_methods(os.path.join(ref, "diffusion.py"), [
        "_subs_parameterization", "_process_sigma", "forward", "_forward_pass_diffusion",
        "q_xt", "_sample_t"]))
    draws = record_draws(stand)
    out = {}
    with torch.no_grad():
        if ema is not None:                  # the reference evaluates the EMA weights
            for p, s in zip(backbone.parameters(), ema):
                p.copy_(s)
        torch.manual_seed(seed)
        loss = stand._forward_pass_diffusion(x0)            # (B, L) per-token NELBO
        cond = stand._process_sigma(stand.noise(draws["t"])[0][:, None])
        out["logits"] = backbone(draws["xt"], cond)
        if ema is not None:
            for p, r in zip(backbone.parameters(), raw):
                p.copy_(r)
            out["logits_raw"] = backbone(draws["xt"], cond)
    out.update(t=draws["t"], xt=draws["xt"], loss=loss, nelbo=loss.mean())
    return cfg, backbone, ema, out


def bd3_case(ref, gen, x0, seed):
    from omegaconf import OmegaConf

    dit = load_module(os.path.join(ref, "models", "dit.py"), "ref_bd3_dit")
    noise = load_module(os.path.join(ref, "noise_schedule.py"), "ref_bd3_noise")
    cfg = OmegaConf.create({
        "mode": "train", "block_size": BLOCK,
        "algo": {"name": "bd3lm", "backbone": "dit", "parameterization": "subs",
                 "time_conditioning": False, "T": 0, "causal_attention": False,
                 "dropout": 0.0, "ignore_bos": False, "cross_attn": True, "var_min": True,
                 "mdlm_loss_scale": False},
        "model": {"name": "fixture", "type": "ddit", "hidden_size": DIM, "cond_dim": COND,
                  "length": LENGTH, "n_blocks": LAYERS, "n_heads": HEADS,
                  "scale_by_sigma": True, "dropout": 0.1, "tie_word_embeddings": False,
                  "attn_backend": "sdpa"},
        "loader": {"eval_batch_size": BATCH},
        "noise": {"type": "loglinear"},
        "training": {"ema": 0, "antithetic_sampling": True, "resample": False,
                     "sampling_eps": 1e-3}})
    backbone = dit.DIT(cfg, vocab_size=V).eval()
    randomize(backbone, gen)
    stand = Stand(backbone=backbone, noise=noise.LogLinearNoise(), mask_index=V - 1,
                  neg_infinity=-1000000.0, time_conditioning=False,
                  parameterization="subs", antithetic_sampling=True,
                  block_size=BLOCK, cross_attn=True, ignore_bos=False,
                  mdlm_loss_scale=False, config=cfg)
    stand.config.algo.name = "bd3lm"
    bind(stand, reference_methods(os.path.join(ref, "diffusion.py"), [
        "_subs_parameterization", "_process_sigma", "forward", "_forward_pass_diffusion",
        "q_xt", "_sample_t", "_sigma_from_p"]))
    draws = record_draws(stand)
    with torch.no_grad():
        torch.manual_seed(seed)
        loss = stand._forward_pass_diffusion(x0, sampling_eps_min=1e-3,
                                             sampling_eps_max=1.0)
        logits = backbone(torch.cat([draws["xt"], x0], -1),
                          stand._process_sigma(stand._sigma_from_p(draws["t"][:, :1])))
    return cfg, backbone, {"t": draws["t"], "xt": draws["xt"], "logits": logits,
                           "loss": loss, "nelbo": loss.mean()}


def lightning_ckpt(backbone, cfg, ema_params=None):
    ckpt = {"epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.2.1",
            "state_dict": {"backbone." + k: v.clone()
                           for k, v in backbone.state_dict().items()},
            "hyper_parameters": {"config": cfg, "tokenizer": GPT2TokenizerFast()}}
    if ema_params is not None:
        ckpt["ema"] = {"decay": 0.9999, "num_updates": 10, "shadow_params": ema_params}
    return ckpt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mdlm", required=True)
    ap.add_argument("--mdlm-commit", required=True)
    ap.add_argument("--bd3lms", required=True)
    ap.add_argument("--bd3lms-commit", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    install_flash_attn_shim()
    pickled_as(GPT2TokenizerFast, "transformers.models.gpt2.tokenization_gpt2_fast")
    gen = torch.Generator().manual_seed(23)
    # GPT-2 style ids: V - 2 plays <|endoftext|> (between documents), V - 1 the mask
    x0 = torch.randint(0, V - 2, (BATCH, LENGTH), generator=gen)
    x0[0, 3] = x0[1, 0] = V - 2

    expected = {"x0": x0}
    cfg, net, ema, out = mdlm_case(args.mdlm, False, gen, x0, seed=1, with_ema=True)
    torch.save(lightning_ckpt(net, cfg, ema), os.path.join(args.out, "mdlm.ckpt"))
    expected["mdlm"] = out

    cfg, net, _, out = mdlm_case(args.mdlm, True, gen, x0, seed=2, with_ema=False)
    hf = os.path.join(args.out, "mdlm_tc_hf")
    os.makedirs(hf, exist_ok=True)
    from safetensors.torch import save_file
    save_file({"backbone." + k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump({"architectures": ["MDLM"], "model_type": "mdlm",
                   "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                                "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
                   "vocab_size": V, "model_length": LENGTH, "hidden_dim": DIM,
                   "cond_dim": COND, "n_blocks": LAYERS, "n_heads": HEADS,
                   "dropout": 0.1, "time_conditioning": True,
                   "torch_dtype": "float32", "transformers_version": "4.38.2"}, f, indent=2)
    expected["mdlm_tc"] = out

    cfg, net, out = bd3_case(args.bd3lms, gen, x0, seed=3)
    torch.save(lightning_ckpt(net, cfg), os.path.join(args.out, "bd3lm.ckpt"))
    expected["bd3lm"] = out

    expected["record"] = {
        # the command, the checkouts named by role (no machine paths in the fixture)
        "made_by": "python " + " ".join(
            {args.mdlm: "REF_MDLM", args.bd3lms: "REF_BD3LMS"}.get(a, a) for a in sys.argv),
        "checkouts": "REF_MDLM, REF_BD3LMS: `git archive` of the repositories below at "
                     "the commits given",
        "mdlm": f"https://github.com/kuleshov-group/mdlm at {args.mdlm_commit}",
        "bd3lms": f"https://github.com/kuleshov-group/bd3lms at {args.bd3lms_commit}",
        "torch": str(torch.__version__),
        "shim": "flash_attn for mdlm's models/dit.py: apply_rotary_emb_qkv_ rotates q, k "
                "in place (non-interleaved rotate-half, the reference's cos/sin), "
                "flash_attn_varlen_qkvpacked_func(causal=False) is per-sequence softmax "
                "attention with scale 1/sqrt(head_dim); fp32 on CPU (the reference's "
                "bf16 autocast is CUDA-only). bd3lms: attn_backend sdpa, no shim.",
        "stand_in": "the loss methods of class Diffusion in each diffusion.py, compiled "
                    "from its syntax tree and bound to an object with the attributes "
                    "they read (lightning, hydra, transformers not needed)",
    }
    torch.save(expected, os.path.join(args.out, "expected.pt"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out)
                for f in fs)
    print(f"wrote {args.out} ({total / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
