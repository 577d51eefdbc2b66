#!/usr/bin/env python
"""MDLM vs autoregressive baselines on one corpus, trained the same way, one command.

    python examples/compare/compare.py --corpus ptb            # PTB, in-domain
    python examples/compare/compare.py --corpus sotu           # SOTU, + zero-shot on PTB test

Three models are trained with fairseq-train on the same binarized data, for the same
number of updates of the same batch (so the same tokens), with the same optimizer,
learning-rate schedule, dropout, window and seed:

  mdlm             --task masked_diffusion --criterion mdlm    --arch mdlm_tiny
  mdlm_ar          --task language_modeling --criterion cross_entropy --arch mdlm_ar_tiny
                   (MDLM's backbone with causal attention: only the objective differs)
  transformer_lm   fairseq's own transformer_lm of the same depth, width and heads

then evaluated on the last checkpoint (equal tokens seen):

  test perplexity   AR: fairseq-eval-lm (exact); MDLM: fairseq-validate --eval-passes K
                    (the NELBO bound, its standard error over the K Monte-Carlo passes)
  zero-shot         the same on a corpus never trained on, tokenized with the same
                    dictionary (--corpus sotu: PTB test encoded with the SOTU sentencepiece
                    model by examples/sotu/prepare.sh --encode-ptb-test)
  generative ppl    unconditional samples of the window length from MDLM at each of
                    --steps and from each AR model (ancestral), scored by both AR
                    models, with the mean unigram entropy of the samples; test blocks of the
                    same length are scored as the reference
  throughput        fairseq's training words/s (median of its log), tokens per CPU-second,
                    wall time of each fairseq-train

Outputs in --out: results.md (the tables), results.json, valid_ppl.png (validation
perplexity / bound against tokens seen) and gen_ppl.png (generative perplexity against
sampling steps). Checkpoints and logs go to --work-dir; running the same command again
reuses finished training runs and resumes interrupted ones (fairseq's checkpoint_last).
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.path.join(REPO, "mdlm_plugin")
MODELS = ("mdlm", "mdlm_ar", "transformer_lm")
AR_MODELS = ("mdlm_ar", "transformer_lm")
COLOURS = {"mdlm": "tab:blue", "mdlm_ar": "tab:green", "transformer_lm": "tab:red"}
# published numbers, for scale (Sahoo et al. 2024, Table 1: LM1B test perplexity, 110M
# parameters; MDLM is a bound)
PAPER = [("LM1B, 33B tokens", 27.04, 22.32), ("LM1B, 327B tokens", 23.00, 20.86)]


class CompareError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"compare: error: {msg}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", choices=("ptb", "sotu"), default="ptb",
                   help="prepared with examples/<corpus>/prepare.sh when --data is missing")
    p.add_argument("--data", help="fairseq-preprocess --only-source directory "
                                  "(default data-bin/<corpus>)")
    p.add_argument("--zero-shot", metavar="DIR",
                   help="a data directory with the same dict.txt and a 'test' split, scored "
                        "zero-shot (default for sotu: <data>/ptb-test; none for ptb)")
    p.add_argument("--work-dir", help="checkpoints and logs (default checkpoints/compare_<corpus>)")
    p.add_argument("--out", help="tables and plots (default examples/compare/results/<corpus>)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated subset of " + ", ".join(MODELS))
    g = p.add_argument_group("training (the same for every model)")
    g.add_argument("--max-update", type=int, default=600)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--tokens-per-sample", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--embed-dim", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--cond-dim", type=int, default=128, help="MDLM backbone's adaLN width")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup-updates", type=int, default=100)
    g.add_argument("--validate-interval-updates", type=int, default=100,
                   help="validation points of the curve (and checkpoint interval)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: torch's default)")
    g.add_argument("--extra-train-args", default="",
                   help="more fairseq-train flags for every model, e.g. '--fp16'")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-passes", type=int, default=4, help="MDLM bound: Monte-Carlo passes")
    e.add_argument("--samples", type=int, default=16, help="samples per model and step count")
    e.add_argument("--steps", default="16,64,256,1000", help="MDLM sampling steps")
    e.add_argument("--sampler", default="ddpm_cache", choices=("ddpm", "ddpm_cache", "analytic"))
    e.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md and the plots from --out/results.json")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if any(s <= 0 for s in args.steps):
        p.error("--steps must be positive")
    for name in ("max_update", "batch_size", "tokens_per_sample", "eval_passes", "samples",
                 "validate_interval_updates", "sample_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.eval_passes < 2:
        p.error("--eval-passes must be >= 2 to report a standard error")
    args.data = args.data or os.path.join("data-bin", args.corpus)
    if args.zero_shot is None and args.corpus == "sotu":
        args.zero_shot = os.path.join(args.data, "ptb-test")
    args.work_dir = args.work_dir or os.path.join("checkpoints", f"compare_{args.corpus}")
    args.out = args.out or os.path.join(REPO, "examples", "compare", "results", args.corpus)
    return args


# --------------------------------------------------------------------------- helpers

def tool(name: str) -> List[str]:
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return [beside] if os.access(beside, os.X_OK) else [name]


def use_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def env(args) -> Dict[str, str]:
    e = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.threads:
        e.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return e


def run(cmd: List[str], log: str, args, what: str) -> Dict[str, float]:
    """Run a fairseq CLI with its output in ``log``; wall and CPU seconds used."""
    print(f"  $ {shlex.join(cmd)}\n    (log: {log})", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(args)).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-20:])
        raise CompareError(f"{what} failed (exit {rc}); the end of {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def prepare_data(args) -> None:
    if os.path.isfile(os.path.join(args.data, "dict.txt")) and (
            not args.zero_shot or os.path.isfile(os.path.join(args.zero_shot, "test.idx"))):
        return
    if args.corpus == "ptb" and not args.zero_shot:
        cmd = ["bash", os.path.join(REPO, "examples", "ptb", "prepare.sh"), args.data]
    elif args.corpus == "sotu" and args.zero_shot == os.path.join(args.data, "ptb-test"):
        cmd = ["bash", os.path.join(REPO, "examples", "sotu", "prepare.sh"), args.data,
               "--encode-ptb-test"]
    else:
        missing = args.data if not os.path.isfile(os.path.join(args.data, "dict.txt")) \
            else os.path.join(args.zero_shot, "test.idx")
        raise CompareError(f"{missing} not found: prepare that data first")
    print(f"preparing {args.corpus}: $ {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env(args)).returncode != 0:
        raise CompareError(f"data preparation failed: {shlex.join(cmd)}")


def split_tokens(data_dir: str, split: str) -> int:
    from fairseq.data import data_utils
    ds = data_utils.load_indexed_dataset(os.path.join(data_dir, split), None)
    if ds is None:
        raise CompareError(f"no '{split}' split in {data_dir}")
    return int(ds.sizes.sum())


# --------------------------------------------------------------------------- training

def model_flags(model: str, args) -> List[str]:
    size = ["--layers", args.layers, "--embed-dim", args.embed_dim,
            "--attention-heads", args.heads, "--cond-dim", args.cond_dim,
            "--dropout", args.dropout, "--max-positions", max(512, args.tokens_per_sample)]
    if model == "mdlm":
        spec = ["--user-dir", PLUGIN, "--task", "masked_diffusion", "--criterion", "mdlm",
                "--arch", "mdlm_tiny", "--eval-passes", 1, *size]
    elif model == "mdlm_ar":
        spec = ["--user-dir", PLUGIN, "--task", "language_modeling",
                "--criterion", "cross_entropy", "--arch", "mdlm_ar_tiny", *size]
    else:   # transformer_lm's input/output dims default to 512: set them to the width
        d = args.embed_dim
        spec = ["--task", "language_modeling", "--criterion", "cross_entropy",
                "--arch", "transformer_lm", "--decoder-layers", args.layers,
                "--decoder-embed-dim", d, "--decoder-input-dim", d, "--decoder-output-dim", d,
                "--decoder-ffn-embed-dim", 4 * d, "--decoder-attention-heads", args.heads,
                "--dropout", args.dropout]
    return [str(x) for x in spec]


def train_command(model: str, args, save_dir: str) -> List[str]:
    v = args.validate_interval_updates
    common = ["--tokens-per-sample", args.tokens_per_sample, "--sample-break-mode", "none",
              "--batch-size", args.batch_size, "--required-batch-size-multiple", 1,
              "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--weight-decay", 0.01,
              "--clip-norm", 1.0, "--lr", args.lr, "--lr-scheduler", "inverse_sqrt",
              "--warmup-updates", min(args.warmup_updates, args.max_update),
              "--max-update", args.max_update, "--validate-interval-updates", v,
              "--save-interval-updates", v, "--keep-interval-updates", 1,
              "--no-epoch-checkpoints", "--save-dir", save_dir, "--log-format", "simple",
              "--log-interval", max(1, min(25, args.max_update // 4)), "--seed", args.seed,
              "--num-workers", 0]
    if use_cpu():
        common.append("--cpu")
    return (tool("fairseq-train") + [args.data] + model_flags(model, args)
            + [str(x) for x in common] + shlex.split(args.extra_train_args))


def parse_fields(text: str) -> Dict[str, float]:
    out = {}
    for part in text.split("|"):
        kv = part.strip().split()
        if len(kv) == 2:
            try:
                out[kv[0]] = float(kv[1].replace(",", ""))
            except ValueError:
                pass
    return out


def parse_train_log(text: str) -> Dict[str, object]:
    curve = {}
    for m in re.finditer(r"valid on 'valid' subset \|(.*)", text):
        f = parse_fields(m.group(1))
        if "num_updates" in f and "ppl" in f:
            curve[int(f["num_updates"])] = f["ppl"]
    wps = [float(x) for x in re.findall(r"\bwps=([\d.]+)", text)]
    return {"valid_curve": sorted(curve.items()), "wps_values": wps}


def train(model: str, args) -> Dict[str, object]:
    save_dir = os.path.join(args.work_dir, model)
    os.makedirs(save_dir, exist_ok=True)
    done_file = os.path.join(save_dir, "train_done.json")
    cmd = train_command(model, args, save_dir)
    if os.path.isfile(done_file):
        done = json.load(open(done_file))
        if done.get("command") == cmd:
            print(f"{model}: trained already ({done_file})", flush=True)
            return done
    print(f"{model}: training {args.max_update} updates", flush=True)
    log = os.path.join(save_dir, "train.log")
    resumed = os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt"))
    timing = run(cmd, log, args, f"training {model}")
    parsed = parse_train_log(open(log).read())
    tokens = args.max_update * args.batch_size * args.tokens_per_sample
    wps = sorted(parsed["wps_values"])
    result = {
        "model": model, "command": cmd, "checkpoint": os.path.join(save_dir, "checkpoint_last.pt"),
        "tokens_seen": tokens, "valid_curve": parsed["valid_curve"],
        "train_wps_median": wps[len(wps) // 2] if wps else None,
        "resumed": resumed, **timing,
        "tokens_per_cpu_s": None if resumed else tokens / max(timing["cpu_s"], 1e-9),
    }
    if not os.path.isfile(result["checkpoint"]):
        raise CompareError(f"training {model} wrote no {result['checkpoint']}; see {log}")
    with open(done_file, "w") as f:
        json.dump(result, f, indent=1)
    return result


# --------------------------------------------------------------------------- evaluation

def evaluate(model: str, ckpt: str, data_dir: str, args, tag: str) -> Dict[str, object]:
    """Test perplexity of ``ckpt`` on ``data_dir``'s test split."""
    log = os.path.join(args.work_dir, model, f"eval_{tag}.log")
    if os.path.exists(log):
        os.remove(log)
    dev = ["--cpu"] if use_cpu() else []
    if model == "mdlm":
        cmd = tool("fairseq-validate") + [
            data_dir, "--user-dir", PLUGIN, "--task", "masked_diffusion", "--path", ckpt,
            "--valid-subset", "test", "--batch-size", str(args.batch_size),
            "--tokens-per-sample", str(args.tokens_per_sample),
            "--eval-passes", str(args.eval_passes)] + dev
        run(cmd, log, args, f"fairseq-validate of {model} on {data_dir}")
        m = re.findall(r"valid on 'test' subset \|(.*)", open(log).read())
        if not m:
            raise CompareError(f"no test result in {log}")
        f = parse_fields(m[-1])
        return {"ppl": f["ppl"], "ppl_se": f.get("ppl_se"), "bits": f["loss"],
                "bits_se": f.get("bound_se"), "bound": True,
                "tokens": int(f["scored_tokens"]), "command": cmd}
    cmd = tool("fairseq-eval-lm") + [
        data_dir, "--path", ckpt, "--gen-subset", "test", "--batch-size", str(args.batch_size),
        "--tokens-per-sample", str(args.tokens_per_sample)] + dev
    if model == "mdlm_ar":
        cmd[1:1] = ["--user-dir", PLUGIN]
    run(cmd, log, args, f"fairseq-eval-lm of {model} on {data_dir}")
    text = open(log).read()
    m = re.search(r"Evaluated ([\d,]+) tokens.*", text)
    loss = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", text)
    if not (m and loss):
        raise CompareError(f"no result in {log}")
    return {"ppl": float(loss.group(2)), "ppl_se": 0.0, "bits": float(loss.group(1)),
            "bits_se": 0.0, "bound": False, "tokens": int(m.group(1).replace(",", "")),
            "command": cmd}


def generation(loaded: Dict[str, tuple], args) -> Dict[str, object]:
    """Samples from every model, each scored by every AR model; entropies.
    ``loaded``: model name -> (model, task, facts) from load_checkpoint."""
    import torch
    from mdlm_plugin.diffusion.samplers import unigram_entropy
    from mdlm_plugin.evaluation import ar_samples, data_blocks, generative_perplexity, mdlm_samples
    L, n = args.tokens_per_sample, args.samples
    scorers = [m for m in AR_MODELS if m in loaded]
    dictionary = loaded[scorers[0]][1].source_dictionary     # the AR dictionary (no <mask>)
    eos, forbid = dictionary.eos(), (dictionary.pad(), dictionary.bos())
    sets = []    # (source, steps, tokens, seconds, network calls)
    blocks = data_blocks(args.data, "test", L, n)
    sets.append(("test data", None, blocks, None, None))
    if "mdlm" in loaded:
        model, task, _ = loaded["mdlm"]
        for steps in args.steps:
            start = time.perf_counter()
            tokens, st = mdlm_samples(task, model, n, L, steps, args.sampler, args.seed,
                                      args.sample_batch)
            sets.append((f"mdlm ({args.sampler})", steps, tokens,
                         time.perf_counter() - start, st["network_calls"]))
            print(f"  mdlm {steps} steps: {sets[-1][3]:.1f} s", flush=True)
    for m in scorers:
        model = loaded[m][0]
        start = time.perf_counter()
        tokens = ar_samples(model, n, L, eos, args.seed, args.sample_batch, forbid=forbid)
        sets.append((m, L, tokens, time.perf_counter() - start, L * math.ceil(n / args.sample_batch)))
        print(f"  {m} ancestral: {sets[-1][3]:.1f} s", flush=True)
    rows = []
    for source, steps, tokens, seconds, calls in sets:
        row = {"source": source, "steps": steps, "samples": int(tokens.size(0)),
               "entropy": unigram_entropy(tokens), "seconds": seconds, "network_calls": calls,
               "scored_by": {}}
        for s in scorers:
            with torch.no_grad():
                row["scored_by"][s] = generative_perplexity(loaded[s][0], tokens)
        rows.append(row)
    examples = {}
    for source, steps, tokens, _, _ in sets:
        if source != "test data":
            examples[f"{source} {steps}"] = dictionary.string(tokens[0])
    return {"rows": rows, "scorers": scorers, "length": L, "examples": examples}


# --------------------------------------------------------------------------- report

def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(res: Dict, args) -> str:
    t, models = res["training"], res["models"]
    out = [f"# MDLM vs autoregressive baselines: {args.corpus}", "",
           f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
           f"Date: {res['date']}, git {res['git']}", "",
           f"Each model: {args.max_update} updates of {args.batch_size} x "
           f"{args.tokens_per_sample} tokens ({t[models[0]]['tokens_seen']:,} tokens), "
           f"{args.layers} layers x {args.embed_dim} wide, {args.heads} heads, dropout "
           f"{args.dropout}, Adam lr {args.lr}, inverse-sqrt warm-up {args.warmup_updates}; "
           "evaluated on the last checkpoint.", ""]
    out += ["## Test perplexity", "",
            "AR: exact (fairseq-eval-lm); MDLM: upper bound (NELBO, fairseq-validate, "
            f"{args.eval_passes} passes, SE over passes). Ratio: MDLM bound / AR perplexity.", ""]
    head = ["model", "params", "test ppl", "SE", "bits/token", "tokens scored"]
    rows = []
    for m in models:
        e = res["test"][m]
        rows.append([m, f"{res['params'][m] / 1e6:.2f}M", ("<= " if e["bound"] else "")
                     + fmt(e["ppl"], ".2f"), fmt(e["ppl_se"], ".2f") if e["bound"] else "exact",
                     fmt(e["bits"], ".3f"),
                     f"{e['tokens']:,}"])
    out.append(md_table(head, rows))
    out += ["", f"The test split has {res['test_split_tokens']:,} tokens." + (
        "" if all(res["test"][m]["tokens"] == res["test_split_tokens"] for m in models)
        else " WARNING: not every model scored all of them.")]
    out += [""] + [f"- MDLM / {a}: {res['ratios'][a]:.3f}" for a in res["ratios"]] + [""]
    if "mdlm" in models:
        curve = dict(map(tuple, t["mdlm"]["valid_curve"]))
        for a in res["ratios"]:
            pts = [(u, curve[u] / p) for u, p in t[a]["valid_curve"] if u in curve]
            if pts:
                out.append(f"- validation ratio MDLM / {a} as training goes on (updates: ratio): "
                           + ", ".join(f"{u}: {r:.2f}" for u, r in pts))
        out.append("")
    out += ["For scale, the paper (Sahoo et al. 2024, LM1B, 110M parameters): " +
            "; ".join(f"{name}: MDLM <= {a} vs AR {b} (ratio {a / b:.2f})"
                      for name, a, b in PAPER) + ".", ""]
    if res.get("zero_shot"):
        z = res["zero_shot"]
        out += ["## Zero-shot", "", f"Trained on {args.corpus}, scored on `{args.zero_shot}` "
                "(test split, the same dictionary)." + (
                    " Word-level: exp(total NLL / (words + lines)), PTB's usual token count."
                    if z.get("word_tokens") else ""), ""]
        head = ["model", "ppl per token", "SE"] + (["word-level ppl"] if z.get("word_tokens") else []) \
            + ["tokens scored"]
        rows = []
        for m in models:
            e = z["by_model"][m]
            row = [m, ("<= " if e["bound"] else "") + fmt(e["ppl"], ".2f"),
                   fmt(e["ppl_se"], ".2f") if e["bound"] else "exact"]
            if z.get("word_tokens"):
                row.append(("<= " if e["bound"] else "") + fmt(e["word_ppl"], ".2f"))
            rows.append(row + [f"{e['tokens']:,}"])
        out += [md_table(head, rows), ""]
        out += [f"- MDLM / {a}: {z['ratios'][a]:.3f}" for a in z["ratios"]] + [""]
    if res.get("generation"):
        g = res["generation"]
        out += ["## Generative perplexity", "",
                f"{args.samples} unconditional samples of {g['length']} tokens per row, scored by "
                "each AR model (exp of the mean NLL per token, </s> before the first token); "
                "entropy: mean over samples of the unigram entropy (nats) of each sample's "
                "tokens. AR samples are ancestral (temperature 1, float64 draws); "
                f"MDLM uses `--sampler {args.sampler}`. `test data`: test blocks of the same "
                "length, the reference.", ""]
        head = ["samples from", "steps"] + [f"gen ppl ({s})" for s in g["scorers"]] + \
            ["entropy", "seconds"]
        rows = []
        for r in g["rows"]:
            rows.append([r["source"], "-" if r["steps"] is None else r["steps"]]
                        + [f"{r['scored_by'][s]['ppl']:.1f} ± {r['scored_by'][s]['ppl_se']:.1f}"
                           for s in g["scorers"]]
                        + [f"{r['entropy']:.3f}",
                           "-" if r["seconds"] is None else f"{r['seconds']:.1f}"])
        out += [md_table(head, rows), ""]
        if g.get("targets"):
            out += [f"- {line}" for line in g["targets"]] + [""]
    out += ["## Training", "", "Tokens/s: fairseq's logged `wps` (median over log intervals); "
            "tokens per CPU-second: tokens seen / CPU time of the fairseq-train process "
            "(robust to other load on the machine); wall: the whole run, validation included.", ""]
    head = ["model", "tokens/s", "tokens per CPU-s", "wall (min)", "final valid ppl"]
    rows = []
    for m in models:
        tr = t[m]
        final = tr["valid_curve"][-1][1] if tr["valid_curve"] else None
        rows.append([m, fmt(tr["train_wps_median"], ",.0f"),
                     fmt(tr["tokens_per_cpu_s"], ",.0f"), fmt(tr["wall_s"] / 60, ".1f")
                     + (" (resumed)" if tr["resumed"] else ""), fmt(final, ".1f")])
    out += [md_table(head, rows), "", "Plots: `valid_ppl.png`, `gen_ppl.png`.", ""]
    if res.get("generation", {}).get("examples"):
        out += ["## First sample of each kind", ""]
        for k, s in res["generation"]["examples"].items():
            out += [f"- {k}: `{s[:300]}`"]
        out.append("")
    return "\n".join(out)


def plots(res: Dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    per_update = res["tokens_per_update"]
    for m in res["models"]:
        pts = res["training"][m]["valid_curve"]
        if pts:
            ax.plot([u * per_update for u, _ in pts], [p for _, p in pts], marker="o",
                    color=COLOURS[m], label=m + (" (bound)" if m == "mdlm" else ""))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{res['corpus']}: validation perplexity vs tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "valid_ppl.png"), dpi=120)
    plt.close(fig)

    g = res.get("generation")
    fig, ax = plt.subplots(figsize=(6, 4))
    if g:
        # colour: whose samples; line style: which AR model scored them
        styles = {"mdlm_ar": "-", "transformer_lm": ":"}
        colours = {"test data": "grey", **COLOURS}
        md = [r for r in g["rows"] if r["source"].startswith("mdlm (")]
        for s in g["scorers"]:
            ax.plot([r["steps"] for r in md], [r["scored_by"][s]["ppl"] for r in md],
                    marker="o", color="tab:blue", linestyle=styles.get(s, "-."),
                    label=f"MDLM samples, scored by {s}")
            for r in g["rows"]:
                if not r["source"].startswith("mdlm ("):
                    ax.axhline(r["scored_by"][s]["ppl"], linestyle=styles.get(s, "-."),
                               color=colours.get(r["source"], "black"),
                               label=f"{r['source']}, scored by {s}")
        if md:
            ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("MDLM sampling steps")
    ax.set_ylabel("generative perplexity")
    ax.set_title(f"{res['corpus']}: generative perplexity vs steps")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gen_ppl.png"), dpi=120)
    plt.close(fig)


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{cpu}, {os.cpu_count()} cores, {dev}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def gen_targets(g: Dict) -> List[str]:
    """The issue's target read off the table: MDLM at its largest step count vs each AR's
    own samples, under the same scorer."""
    md = [r for r in g["rows"] if r["source"].startswith("mdlm (")]
    if not md:
        return []
    top = max(md, key=lambda r: r["steps"])
    lines = []
    for r in g["rows"]:
        if r["source"] in AR_MODELS:
            for s in g["scorers"]:
                ratio = top["scored_by"][s]["ppl"] / r["scored_by"][s]["ppl"]
                lines.append(f"scored by {s}: MDLM at {top['steps']} steps / {r['source']} "
                             f"samples = {ratio:.2f} (target <= 1.5); entropy "
                             f"{top['entropy']:.3f} vs {r['entropy']:.3f} "
                             f"({100 * (top['entropy'] / r['entropy'] - 1):+.1f}%, target within 5%)")
    return lines


def write_report(res: Dict, args) -> str:
    text = report(res, args)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    plots(res, args.out)
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        path = os.path.join(args.out, "results.json")
        if not os.path.isfile(path):
            raise CompareError(f"{path} not found: run the comparison first")
        with open(path) as f:
            res = json.load(f)
        print(write_report(res, argparse.Namespace(**{**res["args"], "out": args.out})))
        return
    command = "python " + shlex.join([os.path.relpath(os.path.abspath(__file__))] +
                                     (sys.argv[1:] if argv is None else list(argv)))
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    prepare_data(args)
    trained = {m: train(m, args) for m in args.models}

    res = {"corpus": args.corpus, "command": command, "machine": machine(),
           "date": datetime.date.today().isoformat(), "git": git_revision(),
           "models": args.models, "training": trained, "args": vars(args),
           "tokens_per_update": args.batch_size * args.tokens_per_sample}
    print("test perplexity", flush=True)
    res["test"] = {m: evaluate(m, trained[m]["checkpoint"], args.data, args, "test")
                   for m in args.models}
    res["test_split_tokens"] = split_tokens(args.data, "test")
    ars = [a for a in AR_MODELS if a in args.models]
    if "mdlm" in args.models:
        res["ratios"] = {a: res["test"]["mdlm"]["ppl"] / res["test"][a]["ppl"] for a in ars}
    else:
        res["ratios"] = {}
    if args.zero_shot:
        print(f"zero-shot on {args.zero_shot}", flush=True)
        by_model = {m: evaluate(m, trained[m]["checkpoint"], args.zero_shot, args, "zero_shot")
                    for m in args.models}
        z = {"data": args.zero_shot, "by_model": by_model}
        meta_path = os.path.join(args.zero_shot, "prepare.json")
        if os.path.isfile(meta_path):
            meta = json.load(open(meta_path))
            if meta.get("words") and meta.get("lines"):
                z["word_tokens"] = meta["words"] + meta["lines"]
                for e in by_model.values():   # total NLL is the same; spread over words
                    e["word_ppl"] = 2 ** (e["bits"] * e["tokens"] / z["word_tokens"])
        z["ratios"] = {a: by_model["mdlm"]["ppl"] / by_model[a]["ppl"] for a in ars} \
            if "mdlm" in by_model else {}
        res["zero_shot"] = z
    print("generative perplexity", flush=True)
    import torch
    from mdlm_plugin.evaluation import load_checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = {m: load_checkpoint(trained[m]["checkpoint"], args.data,
                                 {"tokens_per_sample": args.tokens_per_sample})
              for m in args.models}
    res["params"] = {m: loaded[m][2]["params"] for m in args.models}
    if ars:
        res["generation"] = generation(loaded, args)
        res["generation"]["targets"] = gen_targets(res["generation"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(write_report(res, args))
    print(f"written: {args.out}/results.md, results.json, valid_ppl.png, gen_ppl.png")


if __name__ == "__main__":
    main()
