#!/usr/bin/env python
"""MDLM vs autoregressive baselines on one corpus, trained the same way, one command.

    python examples/compare/compare.py --corpus ptb            # PTB, in-domain
    python examples/compare/compare.py --corpus sotu           # SOTU, + zero-shot on PTB test

Three models (``mdlm``, ``mdlm_ar``: MDLM's backbone with causal attention, fairseq's
``transformer_lm`` of the same depth, width and heads) are trained by fairseq-train on the
same data for the same updates of the same batch, with the same optimizer, schedule,
dropout, window and seed (command lines: ``mdlm_plugin.recipes``), then evaluated on the
last checkpoint: test perplexity (AR: fairseq-eval-lm, exact; MDLM: fairseq-validate
--eval-passes K, the bound and its standard error), the same zero-shot on a corpus never
trained on (--zero-shot), generative perplexity of unconditional samples (MDLM at each of
--steps, each AR model ancestral) scored by both AR models with their unigram entropy,
and training throughput. See examples/compare/README.md.

Outputs in --out: results.md, results.json, valid_ppl.png, gen_ppl.png. Checkpoints and
logs go to --work-dir; the same command again reuses finished training runs and resumes
interrupted ones (fairseq's checkpoint_last). --report-only re-renders from results.json.
"""
import argparse
import datetime
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)     # this checkout's mdlm_plugin, installed or not
from mdlm_plugin import recipes, reporting  # noqa: E402
from mdlm_plugin.reporting import COLOURS, md_table  # noqa: E402

MODELS = ("mdlm", "mdlm_ar", "transformer_lm")
AR_MODELS = ("mdlm_ar", "transformer_lm")
# published numbers, for scale (Sahoo et al. 2024, Table 1: LM1B test perplexity, 110M
# parameters; MDLM is a bound)
PAPER = [("LM1B, 33B tokens", 27.04, 22.32), ("LM1B, 327B tokens", 23.00, 20.86)]


class CompareError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"compare: error: {msg}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    for flag, kind, default in (("--max-update", int, 600), ("--batch-size", int, 32),
                                ("--tokens-per-sample", int, 128), ("--layers", int, 4),
                                ("--embed-dim", int, 256), ("--heads", int, 4),
                                ("--dropout", float, 0.1), ("--lr", float, 1e-3),
                                ("--warmup-updates", int, 100), ("--seed", int, 1)):
        g.add_argument(flag, type=kind, default=default)
    g.add_argument("--cond-dim", type=int, default=128, help="MDLM backbone's adaLN width")
    g.add_argument("--validate-interval-updates", type=int, default=100,
                   help="validation points of the curve (and checkpoint interval)")
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
    return p


def parse_args(argv=None):
    p = build_parser()
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

def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(cmd: List[str], log: str, args, what: str) -> Dict[str, float]:
    """Run a fairseq CLI with its output in ``log``; wall and CPU seconds used."""
    print(f"  $ {shlex.join(cmd)}\n    (log: {log})", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
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
    if subprocess.run(cmd).returncode != 0:
        raise CompareError(f"data preparation failed: {shlex.join(cmd)}")


def split_tokens(data_dir: str, split: str) -> int:
    from fairseq.data import data_utils
    ds = data_utils.load_indexed_dataset(os.path.join(data_dir, split), None)
    if ds is None:
        raise CompareError(f"no '{split}' split in {data_dir}")
    return int(ds.sizes.sum())


# --------------------------------------------------------------------------- training

def train_command(model: str, args, save_dir: str) -> List[str]:
    """The recipe of every model: the same window, batch, optimizer, schedule, seed."""
    v = args.validate_interval_updates
    size = recipes.Size(args.layers, args.embed_dim, args.heads, cond_dim=args.cond_dim,
                        max_positions=max(512, args.tokens_per_sample))
    protocol = recipes.data_flags(args.tokens_per_sample, args.batch_size) + [
        "--required-batch-size-multiple", 1,
        *recipes.adam_inverse_sqrt(args.lr, min(args.warmup_updates, args.max_update)),
        "--max-update", args.max_update, "--validate-interval-updates", v,
        "--save-interval-updates", v, "--keep-interval-updates", 1, "--no-epoch-checkpoints",
        "--save-dir", save_dir, "--log-format", "json",
        "--log-interval", max(1, min(25, args.max_update // 4)), "--seed", args.seed,
        "--num-workers", 0]
    return recipes.train_command(
        model, args.data, protocol, size=size, dropout=args.dropout, device=device(),
        model_extra=["--eval-passes", 1] if model == "mdlm" else [],
        overrides=shlex.split(args.extra_train_args))


def without_log_format(cmd: List[str]) -> List[str]:
    """A command without its --log-format value: runs that differ only there trained the
    same model (runs finished before compare.py read JSON logs are reused as they are)."""
    return [t for i, t in enumerate(cmd) if not (i and cmd[i - 1] == "--log-format")]


def read_train_log(text: str) -> Dict[str, object]:
    """The validation curve (updates, ppl) and the words/s of each log interval."""
    curve = {}
    for r in map(recipes.numbers, recipes.json_records(text, "valid")):
        if "valid_num_updates" in r and "valid_ppl" in r:
            curve[int(r["valid_num_updates"])] = r["valid_ppl"]
    wps = [r["wps"] for r in map(recipes.numbers, recipes.json_records(text, "train_inner"))
           if "wps" in r]
    return {"valid_curve": sorted(curve.items()), "wps_values": wps}


def train(model: str, args) -> Dict[str, object]:
    save_dir = os.path.join(args.work_dir, model)
    os.makedirs(save_dir, exist_ok=True)
    done_file = os.path.join(save_dir, "train_done.json")
    cmd = train_command(model, args, save_dir)
    if os.path.isfile(done_file):
        with open(done_file) as f:
            done = json.load(f)
        if without_log_format(done.get("command") or []) == without_log_format(cmd):
            print(f"{model}: trained already ({done_file})", flush=True)
            return done
    print(f"{model}: training {args.max_update} updates", flush=True)
    log = os.path.join(save_dir, "train.log")
    resumed = os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt"))
    timing = run(cmd, log, args, f"training {model}")
    with open(log) as f:
        parsed = read_train_log(f.read())
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
    cmd = recipes.eval_command(model, data_dir, ckpt, batch_size=args.batch_size,
                               tokens_per_sample=args.tokens_per_sample,
                               eval_passes=args.eval_passes, device=device())
    run(cmd, log, args, f"evaluation of {model} on {data_dir}")
    with open(log) as f:
        text = f.read()
    if recipes.family(model).evaluator == "validate":
        records = recipes.json_records(text, "test")
        if not records:
            raise CompareError(f"no test result in {log}")
        r = recipes.numbers(records[-1])
        return {"ppl": r["test_ppl"], "ppl_se": r.get("test_ppl_se"), "bits": r["test_loss"],
                "bits_se": r.get("test_bound_se"), "bound": True,
                "tokens": int(r["test_scored_tokens"]), "command": cmd}
    r = recipes.eval_lm_result(text)
    if r is None:
        raise CompareError(f"no result in {log}")
    return {"ppl": r["ppl"], "ppl_se": 0.0, "bits": r["bits"], "bits_se": 0.0,
            "bound": False, "tokens": r["tokens"], "command": cmd}


def zero_shot(trained: Dict, ratios_to: List[str], args) -> Dict[str, object]:
    """Every model on --zero-shot's test split; per word too when its prepare.json says
    how many words (and lines) it holds."""
    print(f"zero-shot on {args.zero_shot}", flush=True)
    by_model = {m: evaluate(m, trained[m]["checkpoint"], args.zero_shot, args, "zero_shot")
                for m in args.models}
    z = {"data": args.zero_shot, "by_model": by_model}
    meta_path = os.path.join(args.zero_shot, "prepare.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("words") and meta.get("lines"):
            z["word_tokens"] = meta["words"] + meta["lines"]
            for e in by_model.values():   # total NLL is the same; spread over words
                e["word_ppl"] = 2 ** (e["bits"] * e["tokens"] / z["word_tokens"])
    z["ratios"] = {a: by_model["mdlm"]["ppl"] / by_model[a]["ppl"] for a in ratios_to} \
        if "mdlm" in by_model else {}
    return z


def sample_sets(loaded: Dict[str, tuple], scorers: List[str], dictionary, args) -> List[tuple]:
    """(source, steps, tokens, seconds, network calls): test blocks, MDLM at each of
    --steps, each AR model ancestral."""
    from mdlm_plugin.generative_eval import ar_samples, data_blocks, mdlm_samples
    L, n = args.tokens_per_sample, args.samples
    sets = [("test data", None, data_blocks(args.data, "test", L, n), None, None)]
    if "mdlm" in loaded:
        model, task, _ = loaded["mdlm"]
        for steps in args.steps:
            start = time.perf_counter()
            tokens, st = mdlm_samples(task, model, n, L, steps, args.sampler, args.seed,
                                      args.sample_batch)
            sets.append((f"mdlm ({args.sampler})", steps, tokens,
                         time.perf_counter() - start, st["network_calls"]))
            print(f"  mdlm {steps} steps: {sets[-1][3]:.1f} s", flush=True)
    forbid = (dictionary.pad(), dictionary.bos())
    for m in scorers:
        start = time.perf_counter()
        tokens = ar_samples(loaded[m][0], n, L, dictionary.eos(), args.seed, args.sample_batch,
                            forbid=forbid)
        sets.append((m, L, tokens, time.perf_counter() - start,
                     L * math.ceil(n / args.sample_batch)))
        print(f"  {m} ancestral: {sets[-1][3]:.1f} s", flush=True)
    return sets


def generation(loaded: Dict[str, tuple], args) -> Dict[str, object]:
    """Samples from every model, each scored by every AR model; entropies.
    ``loaded``: model name -> (model, task, facts) from load_checkpoint."""
    import torch
    from mdlm_plugin.diffusion.samplers import unigram_entropy
    from mdlm_plugin.generative_eval import generative_perplexity
    scorers = [m for m in AR_MODELS if m in loaded]
    dictionary = loaded[scorers[0]][1].source_dictionary     # the AR dictionary (no <mask>)
    sets = sample_sets(loaded, scorers, dictionary, args)
    rows = []
    for source, steps, tokens, seconds, calls in sets:
        row = {"source": source, "steps": steps, "samples": int(tokens.size(0)),
               "entropy": unigram_entropy(tokens), "seconds": seconds, "network_calls": calls,
               "scored_by": {}}
        for s in scorers:
            with torch.no_grad():
                row["scored_by"][s] = generative_perplexity(loaded[s][0], tokens)
        rows.append(row)
    examples = {f"{source} {steps}": dictionary.string(tokens[0])
                for source, steps, tokens, _, _ in sets if source != "test data"}
    g = {"rows": rows, "scorers": scorers, "length": args.tokens_per_sample,
         "examples": examples}
    g["targets"] = gen_targets(g)
    return g


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
                             f"({100 * (top['entropy'] / r['entropy'] - 1):+.1f}%, "
                             "target within 5%)")
    return lines


# --------------------------------------------------------------------------- report

def fmt(x, spec=".1f") -> str:
    return reporting.fmt(x, spec, missing="-")


def bound_cells(e: Dict, key: str = "ppl") -> List[str]:
    """``<= ppl`` and its SE for MDLM's bound; the exact value and ``exact`` otherwise."""
    return [("<= " if e["bound"] else "") + fmt(e[key], ".2f"),
            fmt(e["ppl_se"], ".2f") if e["bound"] else "exact"]


def header_section(res: Dict, args) -> List[str]:
    t = res["training"][res["models"][0]]
    return [f"# MDLM vs autoregressive baselines: {args.corpus}", "",
            f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
            f"Date: {res['date']}, git {res['git']}", "",
            f"Each model: {args.max_update} updates of {args.batch_size} x "
            f"{args.tokens_per_sample} tokens ({t['tokens_seen']:,} tokens), "
            f"{args.layers} layers x {args.embed_dim} wide, {args.heads} heads, dropout "
            f"{args.dropout}, Adam lr {args.lr}, inverse-sqrt warm-up {args.warmup_updates}; "
            "evaluated on the last checkpoint.", ""]


def test_section(res: Dict, args) -> List[str]:
    models, t = res["models"], res["training"]
    out = ["## Test perplexity", "",
           "AR: exact (fairseq-eval-lm); MDLM: upper bound (NELBO, fairseq-validate, "
           f"{args.eval_passes} passes, SE over passes). Ratio: MDLM bound / AR perplexity.", ""]
    rows = [[m, f"{res['params'][m] / 1e6:.2f}M", *bound_cells(res["test"][m]),
             fmt(res["test"][m]["bits"], ".3f"), f"{res['test'][m]['tokens']:,}"] for m in models]
    out.append(md_table(["model", "params", "test ppl", "SE", "bits/token", "tokens scored"], rows))
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
    return out + ["For scale, the paper (Sahoo et al. 2024, LM1B, 110M parameters): " +
                  "; ".join(f"{name}: MDLM <= {a} vs AR {b} (ratio {a / b:.2f})"
                            for name, a, b in PAPER) + ".", ""]


def zero_shot_section(res: Dict, args) -> List[str]:
    z = res.get("zero_shot")
    if not z:
        return []
    words = bool(z.get("word_tokens"))
    out = ["## Zero-shot", "", f"Trained on {args.corpus}, scored on `{args.zero_shot}` "
           "(test split, the same dictionary)." + (
               " Word-level: exp(total NLL / (words + lines)), PTB's usual token count."
               if words else ""), ""]
    head = ["model", "ppl per token", "SE"] + (["word-level ppl"] if words else []) \
        + ["tokens scored"]
    rows = []
    for m in res["models"]:
        e = z["by_model"][m]
        word = [bound_cells(e, "word_ppl")[0]] if words else []
        rows.append([m, *bound_cells(e), *word, f"{e['tokens']:,}"])
    out += [md_table(head, rows), ""]
    return out + [f"- MDLM / {a}: {z['ratios'][a]:.3f}" for a in z["ratios"]] + [""]


def generation_section(res: Dict, args) -> List[str]:
    g = res.get("generation")
    if not g:
        return []
    out = ["## Generative perplexity", "",
           f"{args.samples} unconditional samples of {g['length']} tokens per row, scored by "
           "each AR model (exp of the mean NLL per token, </s> before the first token); "
           "entropy: mean over samples of the unigram entropy (nats) of each sample's "
           "tokens. AR samples are ancestral (temperature 1, float64 draws); "
           f"MDLM uses `--sampler {args.sampler}`. `test data`: test blocks of the same "
           "length, the reference.", ""]
    head = ["samples from", "steps"] + [f"gen ppl ({s})" for s in g["scorers"]] + \
        ["entropy", "seconds"]
    rows = [[r["source"], "-" if r["steps"] is None else r["steps"]]
            + [f"{r['scored_by'][s]['ppl']:.1f} ± {r['scored_by'][s]['ppl_se']:.1f}"
               for s in g["scorers"]]
            + [f"{r['entropy']:.3f}", "-" if r["seconds"] is None else f"{r['seconds']:.1f}"]
            for r in g["rows"]]
    out += [md_table(head, rows), ""]
    if g.get("targets"):
        out += [f"- {line}" for line in g["targets"]] + [""]
    return out


def training_section(res: Dict) -> List[str]:
    out = ["## Training", "", "Tokens/s: fairseq's logged `wps` (median over log intervals); "
           "tokens per CPU-second: tokens seen / CPU time of the fairseq-train process "
           "(robust to other load on the machine); wall: the whole run, validation included.", ""]
    rows = []
    for m in res["models"]:
        tr = res["training"][m]
        final = tr["valid_curve"][-1][1] if tr["valid_curve"] else None
        rows.append([m, fmt(tr["train_wps_median"], ",.0f"),
                     fmt(tr["tokens_per_cpu_s"], ",.0f"), fmt(tr["wall_s"] / 60, ".1f")
                     + (" (resumed)" if tr["resumed"] else ""), fmt(final, ".1f")])
    head = ["model", "tokens/s", "tokens per CPU-s", "wall (min)", "final valid ppl"]
    out += [md_table(head, rows), "", "Plots: `valid_ppl.png`, `gen_ppl.png`.", ""]
    examples = res.get("generation", {}).get("examples")
    if examples:
        out += ["## First sample of each kind", ""]
        out += [f"- {k}: `{s[:300]}`" for k, s in examples.items()] + [""]
    return out


def report(res: Dict, args) -> str:
    return "\n".join(header_section(res, args) + test_section(res, args)
                     + zero_shot_section(res, args) + generation_section(res, args)
                     + training_section(res))


def plot_valid(res: Dict, path: str) -> None:
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in res["models"]:
        pts = res["training"][m]["valid_curve"]
        if pts:
            ax.plot([u * res["tokens_per_update"] for u, _ in pts], [p for _, p in pts],
                    marker="o", color=COLOURS[m], label=m + (" (bound)" if m == "mdlm" else ""))
    ax.set(xlabel="tokens seen", ylabel="validation perplexity", yscale="log",
           title=f"{res['corpus']}: validation perplexity vs tokens")
    ax.legend()
    reporting.save_figure(fig, path)


def plot_generation(res: Dict, path: str) -> None:
    """Colour: whose samples; line style: which AR model scored them."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    g = res.get("generation")
    styles = {"mdlm_ar": "-", "transformer_lm": ":"}
    md = [r for r in (g["rows"] if g else []) if r["source"].startswith("mdlm (")]
    for s in (g["scorers"] if g else []):
        ax.plot([r["steps"] for r in md], [r["scored_by"][s]["ppl"] for r in md], marker="o",
                color=COLOURS["mdlm"], linestyle=styles.get(s, "-."),
                label=f"MDLM samples, scored by {s}")
        for r in g["rows"]:
            if not r["source"].startswith("mdlm ("):
                ax.axhline(r["scored_by"][s]["ppl"], linestyle=styles.get(s, "-."),
                           color=COLOURS.get(r["source"], "black"),
                           label=f"{r['source']}, scored by {s}")
    if g:
        ax.set(xscale="log" if md else "linear", yscale="log")
    ax.set(xlabel="MDLM sampling steps", ylabel="generative perplexity",
           title=f"{res['corpus']}: generative perplexity vs steps")
    ax.legend(fontsize=6)
    reporting.save_figure(fig, path)


def write_report(res: Dict, args) -> str:
    text = report(res, args)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    plot_valid(res, os.path.join(args.out, "valid_ppl.png"))
    plot_generation(res, os.path.join(args.out, "gen_ppl.png"))
    return text


# --------------------------------------------------------------------------- main

def report_only(args) -> None:
    path = os.path.join(args.out, "results.json")
    if not os.path.isfile(path):
        raise CompareError(f"{path} not found: run the comparison first")
    with open(path) as f:
        res = json.load(f)
    print(write_report(res, argparse.Namespace(**{**res["args"], "out": args.out})))


def evaluate_all(res: Dict, trained: Dict, args) -> None:
    """Test perplexity, zero-shot, and the generative evaluation, into ``res``."""
    print("test perplexity", flush=True)
    res["test"] = {m: evaluate(m, trained[m]["checkpoint"], args.data, args, "test")
                   for m in args.models}
    res["test_split_tokens"] = split_tokens(args.data, "test")
    ars = [a for a in AR_MODELS if a in args.models]
    res["ratios"] = {a: res["test"]["mdlm"]["ppl"] / res["test"][a]["ppl"] for a in ars} \
        if "mdlm" in args.models else {}
    if args.zero_shot:
        res["zero_shot"] = zero_shot(trained, ars, args)
    print("generative perplexity", flush=True)
    import torch
    from mdlm_plugin.generative_eval import load_checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = {m: load_checkpoint(trained[m]["checkpoint"], args.data,
                                 {"tokens_per_sample": args.tokens_per_sample})
              for m in args.models}
    res["params"] = {m: loaded[m][2]["params"] for m in args.models}
    if ars:
        res["generation"] = generation(loaded, args)


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    command = "python " + shlex.join([os.path.relpath(os.path.abspath(__file__))] +
                                     (sys.argv[1:] if argv is None else list(argv)))
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    prepare_data(args)
    trained = {m: train(m, args) for m in args.models}
    res = {"corpus": args.corpus, "command": command,
           "machine": reporting.machine_line(reporting.machine(device(), args.threads or None)),
           "date": datetime.date.today().isoformat(), "git": reporting.git_revision(),
           "models": args.models, "training": trained, "args": vars(args),
           "tokens_per_update": args.batch_size * args.tokens_per_sample}
    evaluate_all(res, trained, args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(write_report(res, args))
    print(f"written: {args.out}/results.md, results.json, valid_ppl.png, gen_ppl.png")


if __name__ == "__main__":
    main()
