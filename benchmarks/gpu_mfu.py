"""GPU training speed and model FLOPs utilisation: MDLM `mdlm_small` vs fairseq's
`transformer_lm` of the same size, at length 1024, through fairseq-train (command lines from
``mdlm_plugin.recipes``). FLOPs, MFU and the bf16 entry point: benchmarks/README.md.

    python benchmarks/gpu_mfu.py                 # on one H100/H200: about 4-6 minutes
    python benchmarks/gpu_mfu.py --smoke         # tiny sizes on CPU: checks the pipeline
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def _fairseq_train_bf16(argv):
    """fairseq-train with --bf16 on CPU/GPU: fairseq's argument post-processing makes
    --bf16 imply --tpu; undo only that (the trainer's bf16 path is device-agnostic)."""
    from fairseq_cli import train   # first: it sets up fairseq's log format
    from fairseq import options
    original = options.parse_args_and_arch

    def parse_args_and_arch(*a, **kw):
        ns = original(*a, **kw)
        if getattr(ns, "bf16", False) and "--tpu" not in argv:
            ns.tpu = False
        return ns

    options.parse_args_and_arch = parse_args_and_arch
    sys.argv = ["fairseq-train", *argv]
    train.cli_main()


if __name__ == "__main__" and sys.argv[1:2] == ["--fairseq-train-bf16"]:
    sys.exit(_fairseq_train_bf16(sys.argv[2:]))     # before anything else imports fairseq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import measure  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402

# peak dense bf16 tensor-core FLOP/s (NVIDIA data sheets, without sparsity)
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989.4e12),
             ("H100", 989.4e12), ("A100", 312e12)]
FLAGS = {"--smoke": (bool, False, "tiny models and data on CPU"),
         "--data": (str, None, "binarized data (default: a random corpus, built once)"),
         "--vocab": (int, 50257, "random corpus: vocabulary"),
         "--corpus-tokens": (int, 2_000_000, "random corpus: training tokens"),
         "--seq-len": (int, 1024, None), "--batch-size": (int, 32, "sequences per update"),
         "--layers": (int, 12, None), "--dim": (int, 768, None), "--heads": (int, 12, None),
         "--ffn": (int, 3072, "transformer_lm FFN width (MDLM's is 4 x dim)"),
         "--warmup-updates": (int, 20, "updates not measured"),
         "--updates": (int, 60, "measured updates"), "--log-interval": (int, 10, None),
         "--repeats": (int, 2, "runs per model, interleaved"),
         "--models": (str, "mdlm,transformer_lm", None), "--num-workers": (int, 2, None),
         "--peak-tflops": (float, None, "peak dense bf16 TFLOP/s (default: from the GPU name)"),
         "--run-timeout": (int, 240, "seconds per run"),
         "--workdir": (str, os.path.join(tempfile.gettempdir(), "mdlm_gpu_mfu"), None),
         "--output-dir": (str, None, "default benchmarks/results/gpu (--smoke: WORKDIR/...)")}
SMOKE = dict(vocab=500, corpus_tokens=60_000, seq_len=64, batch_size=4, layers=2, dim=64,
             heads=2, ffn=256, warmup_updates=2, updates=6, log_interval=2, num_workers=0,
             repeats=1, run_timeout=300)


def parse_args(argv=None):
    p = measure.parser(__doc__, FLAGS)
    p.add_argument("--precision", choices=["bf16", "fp16", "amp"], default="bf16")
    args = p.parse_args(argv)
    for k, v in SMOKE.items() if args.smoke else ():
        if getattr(args, k) == p.get_default(k):
            setattr(args, k, v)
    if args.updates % args.log_interval or args.warmup_updates % args.log_interval:
        p.error("--updates and --warmup-updates must be multiples of --log-interval")
    if args.output_dir is None:
        args.output_dir = (os.path.join(args.workdir, "smoke_results") if args.smoke
                           else os.path.join(REPO, "benchmarks", "results", "gpu"))
    return args


# ---------------------------------------------------------------------------- data

def random_corpus(args) -> str:
    """A uniformly random corpus (lines of 100 tokens), binarized by fairseq-preprocess;
    built once per (vocab, size) under --workdir."""
    import numpy as np
    dest = os.path.join(args.workdir, f"random_v{args.vocab}_n{args.corpus_tokens}")
    if os.path.exists(os.path.join(dest, "train.idx")):
        return dest
    raw = os.path.join(args.workdir, "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array([f"t{i}" for i in range(args.vocab)])
    for split, n in (("train", args.corpus_tokens), ("valid", max(args.corpus_tokens // 100,
                                                                  args.seq_len * 4))):
        ids = rng.integers(0, args.vocab, size=(max(1, n // 100), 100))
        with open(os.path.join(raw, f"{split}.txt"), "w") as f:
            f.writelines(" ".join(words[row]) + "\n" for row in ids)
    workers = max(1, min(8, reporting.usable_cores()))
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
           "--trainpref", os.path.join(raw, "train.txt"),
           "--validpref", os.path.join(raw, "valid.txt"),
           "--destdir", dest, "--workers", str(workers)]
    print("binarizing a random corpus:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dest


# ---------------------------------------------------------------------------- runs

def train_command(model, args, data, device):
    """The recipe's command for ``model`` at --layers x --dim (transformer_lm sized to
    match, with GELU like MDLM), adamw_torch from the plugin, the chosen precision."""
    entry = ([sys.executable, os.path.abspath(__file__), "--fairseq-train-bf16"]
             if args.precision == "bf16" else [sys.executable, "-m", "fairseq_cli.train"])
    protocol = recipes.data_flags(args.seq_len, args.batch_size) + [
        "--optimizer", "adamw_torch", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01",
        "--clip-norm", "1.0", "--lr", "3e-4", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "10", "--max-update", args.warmup_updates + args.updates,
        "--seed", "1", "--no-save", "--disable-validation", "--num-workers", args.num_workers,
        "--log-format", "json", "--log-interval", args.log_interval,
        "--save-dir", os.path.join(args.workdir, "unused"), "--" + args.precision]
    if model in ("mdlm", "mdlm_ar"):     # MDLM, or its autoregressive twin (same DiT)
        size = recipes.Size(args.layers, args.dim, args.heads, max_positions=args.seq_len)
        return recipes.train_command(model, data, protocol, exe=entry, size=size,
                                     arch=f"{model}_small", dropout="0.1", device=device)
    size = recipes.Size(args.layers, args.dim, args.heads, ffn=args.ffn)
    return recipes.train_command(
        "transformer_lm", data, protocol, exe=entry, size=size, dropout="0.1", user_dir=True,
        device=device, overrides=["--activation-fn", "gelu", "--attention-dropout", "0.0"])


def run_once(model, rep, args, data, device, log_dir):
    cmd, log = train_command(model, args, data, device), f"{log_dir}/{model}_run{rep}.log"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    out = measure.run_logged(cmd, log, env, REPO, args.run_timeout, what=f"{model} run {rep}")
    return parse_run(model, "".join(out["lines"]), args, out["wall_s"], cmd)


def parse_run(model, text, args, wall, cmd):
    inner = [recipes.numbers(r) for r in recipes.json_records(text, "train_inner")]
    measured = [r for r in inner if int(r["num_updates"]) > args.warmup_updates]
    if not measured:
        sys.exit(f"{model}: no train_inner records after the warm-up updates")
    wps = [r["wps"] for r in measured]
    gb_free = [r["gb_free"] for r in inner if "gb_free" in r]
    mask = [r["mask_frac"] for r in measured if "mask_frac" in r]
    return {
        "model": model, "command": cmd, "wall_s": round(wall, 1),
        "wps_intervals": wps, "tokens_per_s": statistics.median(wps),
        "params": recipes.logged_params(text), "dictionary": recipes.logged_dictionary_size(text),
        "mask_frac": statistics.mean(mask) if mask else None,
        "min_gb_free": min(gb_free) if gb_free else None,
        "losses": [r["loss"] for r in inner],
    }


# ---------------------------------------------------------------------------- FLOPs

def flops_per_token(args, vocab_out, ffn, head_fraction=1.0):
    body = args.layers * (4 * args.dim ** 2 + 2 * args.dim * ffn)
    head = args.dim * vocab_out
    attention = 12 * args.layers * args.seq_len * args.dim
    return 6 * (body + head_fraction * head) + attention


def gpu_info():
    import torch
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "memory_gb": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "count": torch.cuda.device_count()}


def peak_flops(args, gpu):
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops}"
    if gpu:
        for key, value in PEAK_BF16:
            if key in gpu["name"]:
                return value, f"{key} data sheet, dense bf16"
    return None, "unknown (pass --peak-tflops)"


# ---------------------------------------------------------------------------- report

def summarize(runs, args, peak):
    out = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        tps = statistics.median(r["tokens_per_s"] for r in mine)
        vocab_out = mine[0]["dictionary"] or args.vocab
        ffn = 4 * args.dim if model in ("mdlm", "mdlm_ar") else args.ffn
        f = flops_per_token(args, vocab_out, ffn)
        frac = mine[0]["mask_frac"] if model == "mdlm" else 1.0
        f_exec = flops_per_token(args, vocab_out, ffn, head_fraction=frac or 1.0)
        out[model] = {
            "tokens_per_s": tps, "runs": [r["tokens_per_s"] for r in mine],
            "params": mine[0]["params"], "vocab_out": vocab_out, "ffn": ffn,
            "flops_per_token": f, "executed_flops_per_token": f_exec,
            "mask_frac": mine[0]["mask_frac"],
            "achieved_tflops": tps * f / 1e12,
            "mfu": tps * f / peak if peak else None,
            "executed_mfu": tps * f_exec / peak if peak else None,
            "peak_gb": None,
        }
    return out


def markdown(header, summary, args, runs):
    pct = reporting.pct
    rows = [[model, f"{s['params'] or 0:,}", f"{s['tokens_per_s']:,.0f}",
             ", ".join(f"{x:,.0f}" for x in s["runs"]), f"{s['achieved_tflops']:.1f}",
             pct(s["mfu"], 1), pct(s["executed_mfu"], 1)] for model, s in summary.items()]
    lines = ["# GPU training speed and MFU: MDLM vs transformer_lm", "",
             f"Command: `{header['command']}`", "", f"Machine: {header['machine']}", "",
             f"Setup: {args.layers} layers x {args.dim}, {args.heads} heads, length "
             f"{args.seq_len}, batch {args.batch_size} x {args.seq_len} tokens, precision "
             f"{args.precision}, optimizer adamw_torch, {args.warmup_updates} warm-up + "
             f"{args.updates} measured updates, data: {header['data']}.", "",
             reporting.md_table(["model", "params", "tokens/s (median)", "runs", "TFLOP/s",
                                 "MFU", "executed MFU"], rows, align="lrrlrrr")]
    if header["ratio"] is not None:
        lines += ["", f"Ratio MDLM / transformer_lm tokens/s: {header['ratio']:.2f}."]
    lines += ["", f"Peak: {header['peak_source']}. FLOPs per token = 6 N + 12 n_layers "
              f"seq_len d_model, N = n_layers (4 d^2 + 2 d d_ffn) + d V_out; executed MFU "
              f"counts MDLM's output layer at the masked fraction "
              f"({summary.get('mdlm', {}).get('mask_frac') or 0:.3f}).", "", "Runs:", ""]
    lines += [f"- `{shlex.join(r['command'])}`: {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['wall_s']} s wall" for r in runs]
    return "\n".join(lines) + "\n"


def plot(summary, path, title):
    names = list(summary)
    fig, axes = reporting.pyplot().subplots(1, 2, figsize=(9, 3.6))
    reporting.bars(axes[0], names, [summary[n]["tokens_per_s"] for n in names],
                   [summary[n]["runs"] for n in names], "training tokens/s")
    if all(summary[n]["mfu"] is not None for n in names):
        reporting.bars(axes[1], names, [100 * summary[n]["mfu"] for n in names], ylabel="MFU (%)")
        axes[1].axhline(40, color="gray", ls="--", lw=1)
    else:
        reporting.bars(axes[1], names, [summary[n]["achieved_tflops"] for n in names],
                       ylabel="achieved TFLOP/s (no peak known)")
    reporting.save_figure(fig, path, title)


def run_all(args, data, device, log_dir):
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs = []
    for rep in range(1, args.repeats + 1):
        for model in models:
            runs.append(run_once(model, rep, args, data, device, log_dir))
            print(f"{model} run {rep}: {runs[-1]['tokens_per_s']:,.0f} tokens/s "
                  f"({runs[-1]['wall_s']} s)", flush=True)
    return runs


def pick_device(smoke: bool) -> str:
    """cuda when there is one; cpu only for --smoke (else exit with what to do)."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        sys.exit("no CUDA device: run on a GPU, or use --smoke for a CPU check")
    return device


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = pick_device(args.smoke)
    gpu = gpu_info()
    peak, peak_source = peak_flops(args, gpu)
    log_dir = os.path.join(args.output_dir, "logs")
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    data = args.data or random_corpus(args)
    gpu_name = gpu and f"{gpu['name']} ({gpu['memory_gb']} GiB, CUDA {gpu['cuda']})"
    m = reporting.machine(device, gpu=gpu_name)
    machine = f"{reporting.machine_line(m)}, {time.strftime('%Y-%m-%d %H:%M')}"
    print(f"machine: {machine}\npeak: {peak_source}\ndata: {data}", flush=True)
    t0 = time.time()
    runs = run_all(args, data, device, log_dir)
    summary = summarize(runs, args, peak)
    for r in runs:      # memory: fairseq logs gb_free = total - peak allocated
        if r["min_gb_free"] is not None and gpu:
            summary[r["model"]]["peak_gb"] = round(gpu["memory_gb"] - r["min_gb_free"], 1)
    header = {"command": "python benchmarks/gpu_mfu.py " + shlex.join(argv),
              "machine": machine, "gpu": gpu, "peak_flops": peak, "peak_source": peak_source,
              "data": data if args.data else
              f"random corpus, vocabulary {args.vocab}, {args.corpus_tokens:,} tokens",
              "ratio": reporting.ratio(summary.get("mdlm", {}).get("tokens_per_s"),
                                       summary.get("transformer_lm", {}).get("tokens_per_s")),
              "total_s": round(time.time() - t0, 1)}
    reporting.write_text(os.path.join(args.output_dir, "results.json"), json.dumps(
        {"header": header, "args": vars(args), "summary": summary, "runs": runs}, indent=1))
    md = markdown(header, summary, args, runs)
    reporting.write_text(os.path.join(args.output_dir, "results.md"), md)
    plot(summary, os.path.join(args.output_dir, "throughput_mfu.png"),
         f"{args.layers}x{args.dim}, L={args.seq_len}, {args.precision}; {machine[:60]}")
    print(md)
    print(f"written to {args.output_dir}")


if __name__ == "__main__":
    main()
