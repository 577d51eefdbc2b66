"""GPU acceptance check: everything a freshly lent CUDA machine should show, in one table.

    python benchmarks/gpu_check.py              # one or two H100/H200: about 6-8 minutes
    python benchmarks/gpu_check.py --smoke      # tiny sizes on CPU: proves the script works

Steps (``--steps`` picks some, comma-separated; default all):
  install   CUDA torch kept (not replaced by a CPU wheel), GPUs, apex present or not,
            flex attention available
  train     fairseq-train of mdlm_small at L = 1024 (``gpu_mfu.py``'s commands, random
            corpus): bf16 (hydra entry point of gpu_mfu.py) and --fp16, both with
            adamw_torch (fused on CUDA), and apex FusedAdam (--optimizer adam) when apex
            is present; the AR twin and transformer_lm in bf16 side by side; BD3
            (--block-size 16) with flex attention vs SDPA; NCCL data parallel over two
            GPUs when there are two. Every run: no NaN/inf loss, tokens/s, MFU
  sampling  ddpm_cache sampling speed of an mdlm_small-sized DiT (random weights: the
            speed does not depend on them)

A failed step is a FAIL row (the rest still runs); the exit status is 1 if any row
failed. Results: WORKDIR/gpu_check.{md,json}.
"""
import json
import math
import os
import sys
import time
import traceback
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]
import gpu_mfu  # noqa: E402
import measure  # noqa: E402
from mdlm_plugin import reporting  # noqa: E402

STEPS = ("install", "train", "sampling")
FLAGS = {"--smoke": (bool, False, "tiny sizes on CPU (under a minute on an idle machine)"),
         "--steps": (str, ",".join(STEPS), "which steps, comma-separated"),
         "--runs": (str, None, "train step: only these runs (comma-separated names, e.g. "
                                "mdlm_bf16,bd3_flex; default all that apply)"),
         "--workdir": (str, "/tmp/mdlm_gpu_check", None),
         "--peak-tflops": (float, None, "peak dense bf16/fp16 TFLOP/s (default: GPU name)")}
# gpu_mfu's arguments for the train step: mdlm_small at L = 1024, a few dozen updates
GPU = ["--seq-len", "1024", "--batch-size", "16", "--warmup-updates", "10", "--updates", "30",
       "--log-interval", "10", "--repeats", "1", "--run-timeout", "180"]
SMOKE = ["--smoke", "--warmup-updates", "2", "--updates", "2", "--log-interval", "2",
         "--corpus-tokens", "20000", "--run-timeout", "900"]
BLOCK = 16          # BD3's block size L' (divides 1024 and the smoke length 64)
SAMPLING = {"gpu": dict(layers=12, dim=768, heads=12, vocab=50258, length=1024, batch=16,
                        steps=128),
            "smoke": dict(layers=2, dim=64, heads=2, vocab=501, length=64, batch=2, steps=8)}
HEAD = ["step", "setting", "tokens/s", "MFU", "result"]


def parse_args(argv):
    args = measure.parser(__doc__, FLAGS).parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        sys.exit(f"unknown --steps {sorted(unknown)}: choose from {STEPS}")
    return args


def row(step, setting, tps=None, mfu=None, result="ok"):
    return {"step": step, "setting": setting, "tokens_per_s": tps, "mfu": mfu,
            "result": result}


# ---------------------------------------------------------------------------- install

def install_check(device):
    import torch
    rows = []
    cuda = torch.version.cuda
    ok = device == "cpu" or (cuda is not None and torch.cuda.is_available())
    rows.append(row("install", f"torch {torch.__version__}, CUDA build {cuda or 'none'}",
                    result="ok" if ok else "FAIL: CUDA torch missing or no device"))
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows.append(row("install", f"{len(names)} GPU(s): {', '.join(names)}",
                        result=f"bf16 {'ok' if torch.cuda.is_bf16_supported() else 'FAIL'}"))
    try:
        import apex  # noqa: F401
        apex_result = "present"
    except ImportError:
        apex_result = "absent (fairseq uses torch's Adam, fused AdamW via adamw_torch)"
    rows.append(row("install", "apex", result=apex_result))
    from mdlm_plugin.models.backbone import flex_attention_available
    rows.append(row("install", "flex attention for BD3 training",
                    result="used (auto)" if flex_attention_available(device)
                    else "not used on this device (SDPA)"))
    return rows, apex_result == "present"


# ---------------------------------------------------------------------------- train

def train_plan(device, apex, n_gpus):
    """(name, gpu_mfu model, precision, extra flags) of each training run."""
    bd3 = ["--block-size", str(BLOCK)]
    plan = [("mdlm_bf16", "mdlm", "bf16", [])]
    if device == "cuda":     # fairseq's --fp16 trainer needs CUDA
        plan.append(("mdlm_fp16_adamw_fused", "mdlm", "fp16", []))
    plan += [("mdlm_ar_bf16", "mdlm_ar", "bf16", []),
            ("transformer_lm_bf16", "transformer_lm", "bf16", []),
            ("bd3_sdpa_bf16", "mdlm", "bf16", bd3 + ["--block-attention", "sdpa"])]
    if device == "cuda":     # flex attention has no backward on CPU
        plan.append(("bd3_flex_bf16", "mdlm", "bf16", bd3 + ["--block-attention", "flex"]))
    if apex:
        plan.append(("mdlm_fp16_apex_adam", "mdlm", "fp16", ["--optimizer", "adam"]))
    if n_gpus >= 2:
        plan.append(("mdlm_bf16_2gpu_nccl", "mdlm", "bf16",
                     ["--distributed-world-size", "2", "--ddp-backend", "pytorch_ddp"]))
    return plan


def train_runs(args, device, gpu, only):
    import torch
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    base = gpu_mfu.parse_args((SMOKE if args.smoke else GPU) +
                              ["--workdir", os.path.join(args.workdir, "train")] +
                              (["--peak-tflops", str(args.peak_tflops)]
                               if args.peak_tflops else []))
    os.makedirs(base.workdir, exist_ok=True)
    log_dir = os.path.join(args.workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    data = gpu_mfu.random_corpus(base)
    peak, peak_source = gpu_mfu.peak_flops(base, gpu)
    rows = []
    for name, model, precision, extra in train_plan(device, args.apex, n_gpus):
        if only and name not in only:
            continue
        a = SimpleNamespace(**{**vars(base), "precision": precision})
        setting = f"{name}: {a.layers}x{a.dim}, L={a.seq_len}, batch {a.batch_size}"
        try:
            cmd = gpu_mfu.train_command(model, a, data, device) + extra
            log = os.path.join(log_dir, f"{name}.log")
            env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
            out = measure.run_logged(cmd, log, env, REPO, a.run_timeout)
            if out["returncode"] != 0:
                rows.append(row("train", setting, result=f"FAIL: exit {out['returncode']}, "
                                                         f"log {log}"))
                continue
            run = gpu_mfu.parse_run(model, "".join(out["lines"]), a, out["wall_s"], cmd)
            s = gpu_mfu.summarize([run], a, peak)[model]
            if "--distributed-world-size" in extra and s["mfu"] is not None:
                # fairseq's wps counts every worker's tokens: MFU per device
                s["mfu"] /= int(extra[extra.index("--distributed-world-size") + 1])
            bad = [x for x in run["losses"] if not math.isfinite(x)]
            rows.append(row("train", setting, s["tokens_per_s"], s["mfu"],
                            f"FAIL: {len(bad)} NaN/inf losses" if bad else
                            f"ok: {len(run['losses'])} logged losses finite, last "
                            f"{run['losses'][-1]:.2f}, {run['wall_s']:.0f} s"))
        except (SystemExit, Exception) as e:      # parse_run exits on a log without records
            rows.append(row("train", setting, result=f"FAIL: {e}"))
    return rows, peak_source


# ---------------------------------------------------------------------------- sampling

def sampling_speed(args, device):
    import torch
    from mdlm_plugin.diffusion.samplers import SamplerConfig, sample
    from mdlm_plugin.diffusion.schedules import LogLinearSchedule
    from mdlm_plugin.models.backbone import DiT
    s = SAMPLING["smoke" if args.smoke else "gpu"]
    torch.manual_seed(0)
    net = DiT(s["vocab"], s["dim"], s["layers"], s["heads"], dropout=0.0,
              max_positions=s["length"]).to(device).eval()
    with torch.no_grad():          # random weights, so that the logits are not uniform
        net.final.head.weight.normal_(0, 0.02)
    mask = s["vocab"] - 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def denoiser(z, sigma, positions):
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            return net(z, sigma=sigma, positions=positions).float()

    config = SamplerConfig(sampler="ddpm_cache", steps=s["steps"])
    z = torch.full((s["batch"], s["length"]), mask, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        sample(denoiser, z[:1], config, LogLinearSchedule(), mask, generator=g)   # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample(denoiser, z, config, LogLinearSchedule(), mask, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    tokens = out.tokens
    left = int((tokens == mask).sum())
    setting = (f"ddpm_cache, {s['steps']} steps, {s['batch']} x {s['length']} tokens, "
               f"{s['layers']}x{s['dim']}")
    return [row("sampling", setting, tokens.numel() / wall,
                result="ok" if left == 0 else f"FAIL: {left} positions left masked")]


# ---------------------------------------------------------------------------- report

def table(rows):
    return reporting.md_table(HEAD, [[r["step"], r["setting"], reporting.fmt(r["tokens_per_s"],
                                      ",.0f"), reporting.pct(r["mfu"], 1), r["result"]]
                                     for r in rows], align="llrrl")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = gpu_mfu.pick_device(args.smoke)
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.time()
    gpu = gpu_mfu.gpu_info()
    rows, args.apex, peak_source = [], False, "n/a"
    only = set(args.runs.split(",")) if args.runs else None
    steps = [("install", lambda: install_check(device)),
             ("train", lambda: train_runs(args, device, gpu, only)),
             ("sampling", lambda: (sampling_speed(args, device), None))]
    for name, fn in steps:
        if name not in args.steps and not (name == "install" and "train" in args.steps):
            continue
        print(f"gpu_check: {name} ...", flush=True)
        try:
            new, extra = fn()
        except Exception as e:
            traceback.print_exc()
            new, extra = [row(name, "", result=f"FAIL: {type(e).__name__}: {e}")], None
        if name == "install":
            args.apex = extra
            new = new if "install" in args.steps else []
        elif name == "train":
            peak_source = extra or peak_source
        rows += new
    machine = reporting.machine_line(reporting.machine(
        device, gpu=gpu and f"{gpu['name']} x{gpu['count']} ({gpu['memory_gb']} GiB)"))
    md = "\n".join([f"# GPU check ({'smoke, CPU' if args.smoke else device})", "",
                    f"Machine: {machine}", "", f"Peak for MFU: {peak_source}", "",
                    table(rows), "", f"Total: {time.time() - t0:.0f} s"]) + "\n"
    reporting.write_text(os.path.join(args.workdir, "gpu_check.md"), md)
    reporting.write_text(os.path.join(args.workdir, "gpu_check.json"),
                         json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(md, flush=True)
    return 1 if any(r["result"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
