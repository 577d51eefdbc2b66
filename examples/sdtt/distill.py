#!/usr/bin/env python
"""SDTT rounds on a trained MDLM, then teacher vs students vs AR in one table and plot.

    python examples/sdtt/distill.py --teacher checkpoints/mdlm/checkpoint_best.pt \\
        --judge checkpoints/ar/checkpoint_best.pt --data data-bin/ptb

Round r trains, with fairseq-train --criterion sdtt, a student that takes
start / 2^r steps, started from (and distilled from) the previous round's student (the
first round's teacher is --teacher), down to --stop-steps. Each round is an ordinary
fairseq run in --work-dir/steps_T: a finished one is reused, an interrupted one resumes
when the script runs again. Then every model samples --samples windows
(fairseq-generate's sampler, one thread): the teacher at --teacher-steps and at the
first round's 2T, each student at its own T; the AR baseline (--ar, default the judge)
samples ancestrally with its key/value cache. Each sample set gets its generative
perplexity under the AR judge, unigram entropy, share of repeated 4-grams and seconds
per sample. Outputs in --out: results.md, results.json, sdtt.png. See docs/sdtt.md.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)     # this checkout's mdlm_plugin, installed or not
from mdlm_plugin import reporting  # noqa: E402
from mdlm_plugin.reporting import md_table  # noqa: E402

USER_DIR = os.path.join(REPO, "mdlm_plugin")
# the teacher's model and task settings the student must share (fairseq-train flags)
MODEL_FLAGS = ("embed_dim", "layers", "attention_heads", "cond_dim", "max_positions",
               "dropout")
TASK_FLAGS = ("tokens_per_sample", "noise_schedule", "noise_eps", "sample_break_mode")


class DistillError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"distill: error: {msg}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="the MDLM checkpoint to distil")
    p.add_argument("--data", default=os.path.join(REPO, "data-bin", "ptb"),
                   help="the binarized data the teacher was trained on")
    p.add_argument("--judge", help="AR checkpoint (transformer_lm or mdlm_ar) that scores the "
                   "samples; without it the table has no generative perplexity")
    p.add_argument("--ar", help="AR checkpoint sampled as the baseline (default: --judge)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "checkpoints", "sdtt"))
    p.add_argument("--out", default=os.path.join(REPO, "examples", "sdtt", "results"))
    g = p.add_argument_group("rounds")
    g.add_argument("--start-steps", type=int, default=128, help="the teacher's steps in round 1 "
                   "(2T of the first student)")
    g.add_argument("--stop-steps", type=int, default=8, help="the last student's steps")
    g.add_argument("--updates-per-round", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--warmup-updates", type=int, default=50)
    g.add_argument("--divergence", default="reverse_kl", choices=("reverse_kl", "kl", "mse"))
    g.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddpm_cache", "analytic"),
                   help="the teacher's step rule in training and the students' sampler")
    g.add_argument("--train-threads", type=int, default=2, help="OMP threads of fairseq-train")
    g.add_argument("--extra", default="", help="more fairseq-train flags, one string")
    s = p.add_argument_group("samples")
    s.add_argument("--samples", type=int, default=64)
    s.add_argument("--sample-batch", type=int, default=16)
    s.add_argument("--teacher-steps", type=int, nargs="*", default=[1000],
                   help="more budgets for the teacher (with --teacher-sampler)")
    s.add_argument("--teacher-sampler", default="ddpm_cache")
    s.add_argument("--threads", type=int, default=1, help="torch threads while sampling")
    s.add_argument("--seed", type=int, default=1)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    from mdlm_plugin.diffusion.sdtt import halving_rounds
    try:
        args.rounds = halving_rounds(args.start_steps, args.stop_steps)
    except ValueError as e:
        raise DistillError(f"--stop-steps: {e}") from None
    if not os.path.isfile(args.teacher):
        raise DistillError(f"--teacher {args.teacher}: no such checkpoint")
    for flag in ("judge", "ar"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise DistillError(f"--{flag} {path}: no such checkpoint")
    args.ar = args.ar or args.judge
    return args


def teacher_flags(path: str) -> List[str]:
    """The fairseq-train flags that rebuild the teacher's model and task."""
    import torch
    cfg = torch.load(path, map_location="cpu", weights_only=False)["cfg"]
    from fairseq.models import ARCH_MODEL_REGISTRY
    from mdlm_plugin.models.mdlm import MDLMModel
    model, task = cfg["model"], cfg["task"]
    if not issubclass(ARCH_MODEL_REGISTRY.get(model.get("_name"), object), MDLMModel):
        raise DistillError(f"--teacher {path} is a {model.get('_name')!r} model, not mdlm")
    if model.get("block_size"):
        raise DistillError("block diffusion teachers are not supported (docs/sdtt.md)")
    flags = ["--arch", model["_name"]]
    for name in MODEL_FLAGS:
        flags += [f"--{name.replace('_', '-')}", str(model[name])]
    if model.get("time_conditioning"):
        flags.append("--time-conditioning")
    for name in TASK_FLAGS:
        if task.get(name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(task[name])]
    return flags


def run(cmd: List[str], log: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise DistillError(f"{cmd[2]} failed ({proc.returncode}); log {log}:\n{tail}")


def updates_done(checkpoint: str) -> int:
    import torch
    if not os.path.isfile(checkpoint):
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int((state.get("optimizer_history") or [{}])[-1].get("num_updates") or 0)


def distil(args) -> List[Dict[str, object]]:
    """Every round, in order (a finished one reused, an interrupted one resumed)."""
    flags = teacher_flags(args.teacher)
    teacher, rounds = os.path.abspath(args.teacher), []
    for steps in args.rounds:
        save = os.path.join(args.work_dir, f"steps_{steps}")
        os.makedirs(save, exist_ok=True)
        last = os.path.join(save, "checkpoint_last.pt")
        cmd = [sys.executable, "-m", "fairseq_cli.train", args.data, "--user-dir", USER_DIR,
               "--task", "masked_diffusion", *flags, "--criterion", "sdtt",
               "--teacher-path", teacher, "--finetune-from-model", teacher,
               "--sdtt-steps", str(steps), "--sdtt-divergence", args.divergence,
               "--sdtt-sampler", args.sampler, "--optimizer", "adam", "--lr", str(args.lr),
               "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup_updates),
               "--batch-size", str(args.batch_size), "--max-update",
               str(args.updates_per_round), "--save-dir", save, "--no-epoch-checkpoints",
               "--save-interval-updates", str(max(args.updates_per_round // 4, 1)),
               "--keep-interval-updates", "1", "--log-format", "json", "--log-interval", "10",
               "--num-workers", "0", "--seed", str(args.seed), "--cpu",
               *shlex.split(args.extra)]
        start = time.time()
        if updates_done(last) < args.updates_per_round:
            run(cmd, os.path.join(save, "train.log"), args.train_threads)
        rounds.append({"steps": steps, "teacher": teacher, "checkpoint": last,
                       "seconds": round(time.time() - start, 1), "command": shlex.join(cmd)})
        teacher = last
    return rounds


def score(tokens, judge) -> Dict[str, Optional[float]]:
    from mdlm_plugin.diffusion.samplers import repeated_ngram_share, unigram_entropy
    from mdlm_plugin.generative_eval import generative_perplexity
    out = {"entropy": unigram_entropy(tokens), "repetition": repeated_ngram_share(tokens),
           "gen_ppl": None, "gen_ppl_se": None}
    if judge is not None:
        g = generative_perplexity(judge, tokens)
        out["gen_ppl"], out["gen_ppl_se"] = g["ppl"], g["ppl_se"]
    return out


def evaluate(args, rounds) -> List[Dict[str, object]]:
    """One row per (model, sampler, steps): its sample set's scores and speed."""
    import torch
    from mdlm_plugin.generative_eval import ar_samples, load_checkpoint, mdlm_samples
    torch.set_num_threads(args.threads)
    judge = load_checkpoint(args.judge, args.data)[0] if args.judge else None
    rows = []
    models = [("teacher", args.teacher, [(args.teacher_sampler, s) for s in args.teacher_steps]
               + [(args.sampler, args.start_steps)])]
    models += [(f"student {r['steps']}", r["checkpoint"], [(args.sampler, r["steps"])])
               for r in rounds]
    for name, path, budgets in models:
        net, task, _ = load_checkpoint(path, args.data)
        L = int(task.args.tokens_per_sample)
        for sampler, steps in budgets:
            start = time.perf_counter()
            tokens, st = mdlm_samples(task, net, args.samples, L, steps, sampler, args.seed,
                                      args.sample_batch)
            seconds = time.perf_counter() - start
            rows.append({"model": name, "sampler": sampler, "steps": steps, "length": L,
                         "seconds_per_sample": seconds / args.samples,
                         "calls_per_sample": st["row_calls"] / args.samples,
                         **score(tokens, judge)})
    if args.ar:
        net, task, _ = load_checkpoint(args.ar, args.data)
        d = task.source_dictionary
        L = rows[0]["length"]
        start = time.perf_counter()
        tokens = ar_samples(net, args.samples, L, d.eos(), args.seed, args.sample_batch,
                            forbid=(d.pad(), d.bos()))
        seconds = time.perf_counter() - start
        rows.append({"model": "AR", "sampler": "ancestral (kv cache)", "steps": L, "length": L,
                     "seconds_per_sample": seconds / args.samples, "calls_per_sample": L,
                     **score(tokens, judge)})
    return rows


def report(args, rounds, rows, machine) -> str:
    fmt = reporting.fmt
    table = md_table(
        ["model", "sampler", "steps", "gen. ppl (AR judge)", "entropy", "repeated 4-grams",
         "s / sample", "calls / sample"],
        [[r["model"], r["sampler"], r["steps"],
          fmt(r["gen_ppl"], ",.1f") + (f" ± {r['gen_ppl_se']:.1f}" if r["gen_ppl_se"] else ""),
          fmt(r["entropy"], ".3f"), reporting.pct(r["repetition"], 1),
          fmt(r["seconds_per_sample"], ".3f"), fmt(r["calls_per_sample"], ".0f")]
         for r in rows], align="lllrrrrr")
    lines = [f"# SDTT on {os.path.basename(os.path.normpath(args.data))}", "",
             f"Teacher `{args.teacher}`, {len(rounds)} rounds "
             f"({args.start_steps} -> {args.stop_steps} steps), {args.updates_per_round} "
             f"updates each, batch {args.batch_size}, lr {args.lr}, divergence "
             f"{args.divergence}, sampler {args.sampler}. {args.samples} samples per row, "
             f"seed {args.seed}, {args.threads} torch thread(s). Judge: "
             f"`{args.judge or 'none'}`; AR baseline: `{args.ar or 'none'}`.", "",
             table, "", f"Machine: {reporting.machine_line(machine)}; load average "
             f"{machine['load_average']} at the start of sampling.", "",
             f"Command: `{reporting.invocation(__file__, args.argv)}`", ""]
    return "\n".join(lines)


def plot(rows, path: str) -> None:
    import logging
    logging.getLogger("matplotlib").setLevel(logging.WARNING)   # fairseq logs at DEBUG
    plt = reporting.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("gen_ppl", axes[0], "generative perplexity (AR judge)"),
                           ("seconds_per_sample", axes[1], "seconds per sample")):
        students = [r for r in rows if r["model"].startswith("student") and r[key] is not None]
        if students:
            ax.plot([r["steps"] for r in students], [r[key] for r in students], "o-",
                    color="tab:blue", label="students (SDTT)")
        for r in rows:
            if r[key] is None or r["model"].startswith("student"):
                continue
            colour = "tab:red" if r["model"] == "AR" else "black"
            ax.scatter([r["steps"]], [r[key]], color=colour, marker="s" if r["model"] == "AR"
                       else "^", label=f"{r['model']} ({r['sampler']}, {r['steps']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps (network calls per window)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    reporting.save_figure(fig, path, "SDTT students against the teacher and the AR baseline")


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = argv
    os.makedirs(args.out, exist_ok=True)
    rounds = distil(args)
    machine = reporting.machine(threads=args.threads)
    rows = evaluate(args, rounds)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rounds": rounds, "rows": rows, "machine": machine}, f, indent=1)
    reporting.write_text(os.path.join(args.out, "results.md"),
                         report(args, rounds, rows, machine))
    plot(rows, os.path.join(args.out, "sdtt.png"))
    print(f"distill: wrote {args.out}/results.md, results.json, sdtt.png")


if __name__ == "__main__":
    main()
