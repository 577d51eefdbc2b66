#!/usr/bin/env python
"""Sampling speed: MDLM ``ddpm_cache`` vs ``ddpm`` (``cache_vs_ddpm``: same checkpoint,
seed and samples; wall and CPU time, row evaluations against the schedule-only
expectation, identical tokens), and MDLM at several step counts vs fairseq's own
autoregressive sampling (``speed_vs_ar``: ``SequenceGenerator`` with ``sampling=True`` on
``transformer_lm`` and ``mdlm_ar_tiny``; seconds per sample and unigram entropy), in one
process with the same number and length of unconditional samples. A missing checkpoint
is trained first (command lines from ``mdlm_plugin.recipes``). Details:
benchmarks/README.md.

    python benchmarks/sampling_speed.py [DATA_DIR] [--samples 4] [--threads N]
    python benchmarks/sampling_speed.py --report-only [--output-dir DIR]

Outputs (``--output-dir``, default benchmarks/results/sampling/): results.json,
results.md and sampling_speed.png.
"""
import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import measure  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402
from mdlm_plugin.generative_eval import batches  # noqa: E402
from mdlm_plugin.reporting import COLOURS, md_table, pct  # noqa: E402

DEFAULT_TRAIN_DIR = "/tmp/mdlm_sampling_speed"
SAMPLERS = ("ddpm", "ddpm_cache")
AR_MODELS = ("transformer_lm", "mdlm_ar_tiny")
FAMILY = {"mdlm_tiny": "mdlm", "mdlm_ar_tiny": "mdlm_ar", "transformer_lm": "transformer_lm"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Sampling speed of MDLM (ddpm vs ddpm_cache, several step counts) vs "
                    "fairseq's autoregressive sampling on transformer_lm and mdlm_ar_tiny.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="?", default="data-bin/ptb",
                   help="fairseq-preprocess --only-source directory the models were trained on")
    p.add_argument("--mdlm-ckpt", default="checkpoints/ptb_mdlm_tiny/checkpoint_best.pt",
                   help="MDLM checkpoint (mdlm_tiny); trained into --train-dir if missing")
    p.add_argument("--ar-ckpt", default=f"{DEFAULT_TRAIN_DIR}/mdlm_ar_tiny/checkpoint_last.pt",
                   help="mdlm_ar_tiny checkpoint (language_modeling); trained if missing")
    p.add_argument("--transformer-lm-ckpt",
                   default=f"{DEFAULT_TRAIN_DIR}/transformer_lm/checkpoint_last.pt",
                   help="fairseq transformer_lm checkpoint (4 x 256, 4 heads, FFN 1024); "
                        "trained if missing")
    p.add_argument("--train-dir", default=DEFAULT_TRAIN_DIR,
                   help="where missing checkpoints are trained (<dir>/<model>/checkpoint_last.pt)")
    p.add_argument("--train-updates", type=int, default=200,
                   help="fairseq-train updates for a missing checkpoint")
    p.add_argument("--no-train", action="store_true",
                   help="stop with an error instead of training a missing checkpoint")
    p.add_argument("--length", type=int, default=128,
                   help="tokens per sample L (= the MDLM window, --tokens-per-sample)")
    p.add_argument("--samples", type=int, default=4,
                   help="unconditional samples per configuration (every model and sampler)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="samples per generate call (0: all --samples in one batch)")
    p.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128, 256, 1000],
                   help="MDLM step counts of the comparison with AR (ddpm and ddpm_cache)")
    p.add_argument("--cache-steps", type=int, nargs="+", default=[1000, 0],
                   help="step counts of the ddpm_cache vs ddpm comparison (0 means T = L)")
    p.add_argument("--single-samples", type=int, default=2,
                   help="the cache comparison also samples this many one at a time (batch "
                        "1), where ddpm_cache skips the most calls (0: skip)")
    p.add_argument("--threads", type=int, default=reporting.usable_cores(),
                   help="torch.set_num_threads for sampling (default: the usable cores)")
    p.add_argument("--train-threads", type=int, default=reporting.usable_cores(),
                   help="OMP_NUM_THREADS of fairseq-train for missing checkpoints")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-dir", default="benchmarks/results/sampling",
                   help="results.json, results.md, sampling_speed.png (relative to the repo)")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md and the plot from --output-dir/results.json")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        args.batch_size = args.samples
    if args.samples < 1 or args.length < 2 or args.threads < 1:
        p.error("--samples >= 1, --length >= 2 and --threads >= 1 are required")
    if any(t < 1 for t in args.steps) or any(t < 0 for t in args.cache_steps):
        p.error("--steps must be positive (--cache-steps: positive, or 0 for T = L)")
    args.cache_steps = sorted({t or args.length for t in args.cache_steps}, reverse=True)
    args.steps = sorted(set(args.steps))
    return args


def resolve(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO, path)


# --------------------------------------------------------------------------- checkpoints

def train_command(model: str, args, data_dir: str, save_dir: str) -> List[str]:
    protocol = recipes.data_flags(args.length, 32) + [
        *recipes.adam_inverse_sqrt("1e-3", max(1, min(100, args.train_updates // 4)),
                                   weight_decay=None),
        "--max-update", args.train_updates, "--disable-validation", "--no-epoch-checkpoints",
        "--save-interval-updates", args.train_updates, "--log-format", "simple",
        "--log-interval", 25, "--seed", args.seed, "--cpu", "--num-workers", 0,
        "--save-dir", save_dir]
    model_args = {"mdlm_tiny": {"model_extra": ["--weight-decay", "0.01"]},
                  "transformer_lm": {"size": recipes.ARCH_SIZES["tiny"], "dropout": 0.1}}
    return recipes.train_command(FAMILY[model], data_dir, protocol, device=None,
                                 **model_args.get(model, {}))


def ensure_checkpoint(model: str, path: str, args, data_dir: str) -> Dict[str, object]:
    """The checkpoint at ``path``, or one trained now into --train-dir."""
    if os.path.isfile(path):
        return {"path": path, "trained_here": False}
    save_dir = os.path.join(resolve(args.train_dir), model)
    trained = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.isfile(trained):
        print(f"{model}: {path} missing, using {trained} (trained earlier by this benchmark)")
        return {"path": trained, "trained_here": False}
    if args.no_train:
        sys.exit(f"error: {model} checkpoint {path} not found (and --no-train)")
    os.makedirs(save_dir, exist_ok=True)
    cmd = train_command(model, args, data_dir, save_dir)
    log = os.path.join(save_dir, "train.log")
    print(f"{model}: {path} missing; training {args.train_updates} updates "
          f"(log {log}):\n    $ {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.train_threads),
               MKL_NUM_THREADS=str(args.train_threads))
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc != 0 or not os.path.isfile(trained):
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        sys.exit(f"error: training {model} failed (exit {rc}); last lines of {log}:\n{tail}")
    return {"path": trained, "trained_here": True, "train_command": shlex.join(cmd)}


def load_models(ckpts: Dict, data_dir: str, L: int):
    """(models, tasks) with fairseq's loader; transformer_lm gets one more position than
    it was trained on, for the </s> SequenceGenerator forces after L tokens."""
    from mdlm_plugin.generative_eval import load_checkpoint
    models, tasks = {}, {}
    for name, c in ckpts.items():
        over = {"max_target_positions": L + 1} if name == "transformer_lm" else None
        model, task, facts = load_checkpoint(c["path"], data_dir, over)
        if (name == "mdlm_tiny") != callable(getattr(model, "denoiser", None)):
            sys.exit(f"error: the {name} checkpoint {c['path']} is not a {name} model")
        if name == "mdlm_tiny" and facts["tokens_per_sample"] != L:
            print(f"note: the MDLM was trained with --tokens-per-sample "
                  f"{facts['tokens_per_sample']}; sampling {L} tokens in a window of {L}")
            task.args.tokens_per_sample = L
        model.prepare_for_inference_(SimpleNamespace(generation=SimpleNamespace(
            beam=1, print_alignment=False, no_beamable_mm=False)))
        c.update(facts)
        models[name], tasks[name] = model, task
        print(f"{name:<22}: {c['path']} ({facts['arch']}, {facts['params']:,} params, "
              f"{facts['num_updates']} updates)")
    return models, tasks


# --------------------------------------------------------------------------- sampling

def mdlm_generate(task, model, sampler: str, steps: int, n: int, batch: int, length: int,
                  seed: int):
    """n unconditional samples of ``length`` tokens through task.build_generator."""
    from mdlm_plugin.generative_eval import mdlm_samples
    with measure.Meter() as m:
        tokens, st = mdlm_samples(task, model, n, length, steps, sampler, seed, batch)
    assert tokens.shape == (n, length), tokens.shape
    return tokens, {**m.as_dict(), "network_calls": st["network_calls"],
                    "row_calls": st["row_calls"], "generator_seconds": st["seconds"],
                    "mean_unigram_entropy": st["mean_unigram_entropy"]}


def ar_generate(task, model, n: int, batch: int, length: int, seed: int):
    """n unconditional samples of exactly ``length`` tokens from fairseq's
    SequenceGenerator (sampling, beam 1, incremental decoding), as fairseq-generate
    --sampling --beam 1 --min-len L --max-len-b L builds it."""
    import torch
    from fairseq.dataclass.configs import GenerationConfig
    cfg = GenerationConfig(sampling=True, beam=1, nbest=1, sampling_topk=-1, sampling_topp=-1.0,
                           temperature=1.0, min_len=length, max_len_a=0, max_len_b=length)
    generator = task.build_generator([model], cfg)
    eos, decoder, calls = task.source_dictionary.eos(), model.decoder, [0]
    original = decoder.forward

    def counted(*a, **k):            # EnsembleModel calls decoder.forward directly (no hooks)
        calls[0] += 1
        return original(*a, **k)

    decoder.forward = counted
    torch.manual_seed(seed)          # SequenceGenerator's sampling draws from the global RNG
    rows, steps_per_batch = [], []
    try:
        with measure.Meter() as m:
            for b in batches(n, batch):
                before = calls[0]
                sample = {"id": torch.arange(b), "nsentences": b, "ntokens": b,
                          "net_input": {"src_tokens": torch.full((b, 1), eos, dtype=torch.long),
                                        "src_lengths": torch.ones(b, dtype=torch.long)}}
                rows += [h[0]["tokens"] for h in task.inference_step(generator, [model], sample)]
                steps_per_batch.append(calls[0] - before)
    finally:
        del decoder.forward
    for r in rows:   # L sampled tokens, then the </s> SequenceGenerator appends at max_len
        if r.numel() != length + 1 or int(r[-1]) != eos or bool((r[:length] == eos).any()):
            raise RuntimeError(f"fairseq's SequenceGenerator returned {r.numel()} tokens, "
                               f"expected {length} + </s>")
    return torch.stack([r[:length] for r in rows]), {
        **m.as_dict(), "network_calls": calls[0], "decoder_calls_per_batch": steps_per_batch}


def entropies(tokens, ignore=()) -> List[float]:
    from mdlm_plugin.diffusion.samplers import unigram_entropy
    return [unigram_entropy(row.unsqueeze(0), ignore) for row in tokens]


def mean_se(xs: List[float]):
    n = len(xs)
    mu = sum(xs) / n
    se = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return mu, se


def entropy_stats(tokens, eos: int) -> Dict[str, object]:
    mu, se = mean_se(entropies(tokens))
    return {"entropy": mu, "entropy_se": se,
            "entropy_no_eos": mean_se(entropies(tokens, (eos,)))[0]}


def data_entropy(data_dir: str, split: str, length: int, eos: int) -> Dict[str, object]:
    """Reference: mean unigram entropy of the split's consecutive blocks of ``length``
    tokens (the text the models were trained to imitate, </s> included as in training)."""
    from mdlm_plugin.generative_eval import data_blocks
    try:
        blocks = data_blocks(data_dir, split, length)
    except FileNotFoundError:
        return {}
    mu, se = mean_se(entropies(blocks))
    mu_ne, se_ne = mean_se(entropies(blocks, (eos,)))
    return {"split": split, "blocks": blocks.size(0), "entropy": mu, "entropy_se": se,
            "entropy_no_eos": mu_ne, "entropy_no_eos_se": se_ne}


def expected_calls(schedule, steps: int, positions: int, sampler: str,
                   t_min: float = 1e-5) -> float:
    """Expected denoiser calls of ``samplers.sample`` from fully masked input with
    ``positions`` masked positions. Whether a position leaves the mask at a step depends
    only on the schedule (not on the model), independently per position: after step k
    it is still masked with probability Q[k+1] = m(t_{k+1}) / m(t_0), m = mask_prob.
    ddpm calls the network at each step that starts with a mask, plus once at the end if
    masks are left; ddpm_cache only at the first step and after a step that unmasked at
    least one position, when masks are left."""
    import torch
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    m = schedule.mask_prob(ts).double()
    q = (m / m[0]).clamp(0.0, 1.0)
    n = float(positions)

    def none(p):             # P(no position has an event of probability p)
        return torch.exp(n * torch.log1p(-p.clamp(max=1.0 - 1e-300)))

    if sampler == "ddpm":
        return float((1.0 - none(q)).sum())
    a = (q[:-1] - q[1:]).clamp(min=0.0)       # unmasked at step k-1, for k = 1..steps
    b = q[1:]                                 # still masked after step k-1
    c = 1.0 - q[:-1]                          # unmasked before step k-1
    both = 1.0 - none(a) - none(b) + torch.exp(n * torch.log(c.clamp(min=1e-300)))
    return float(1.0 + both.clamp(min=0.0).sum())


# --------------------------------------------------------------------------- measurements

def cache_row(res: Dict, steps: int, batch: int, count: int, schedule, L: int) -> Dict:
    """One row of the cache comparison from the two samplers' (tokens, stats)."""
    import torch
    (td, sd), (tc, sc) = res["ddpm"], res["ddpm_cache"]
    row = {"steps": steps, "batch": batch, "samples": count, "identical": bool(torch.equal(td, tc)),
           "ddpm": sd, "ddpm_cache": sc,
           # ddpm_cache runs a row only after that row changed: per row, the expected
           # evaluations are those of one sequence of L positions
           "expected_calls_ddpm": count * expected_calls(schedule, steps, L, "ddpm"),
           "expected_calls_cache": count * expected_calls(schedule, steps, L, "ddpm_cache"),
           "speedup_wall": sd["wall_s"] / sc["wall_s"], "speedup_cpu": sd["cpu_s"] / sc["cpu_s"],
           "calls_ratio": sd["row_calls"] / max(1, sc["row_calls"])}
    # ddpm's wall time per row evaluation times ddpm_cache's evaluations is what they
    # cost; the rest is spent in the work they skipped
    per_call = sd["wall_s"] / max(1, sd["row_calls"])
    row["skipped_steps_share"] = max(0.0, 1.0 - sc["row_calls"] * per_call / sc["wall_s"])
    return row


def cache_vs_ddpm(mdlm, mtask, args):
    """``ddpm_cache`` vs ``ddpm`` at each --cache-steps, batched and one at a time; the
    batched runs are reused by :func:`speed_vs_ar`."""
    L, n, B = args.length, args.samples, args.batch_size
    rows, runs = [], {}
    modes = [(n, B)] + ([(args.single_samples, 1)] if args.single_samples > 0 and B > 1 else [])
    for steps in args.cache_steps:
        for count, batch in modes:
            res = {s: mdlm_generate(mtask, mdlm, s, steps, count, batch, L, args.seed)
                   for s in SAMPLERS}
            rows.append(cache_row(res, steps, batch, count, mtask.schedule, L))
            r = rows[-1]
            print(f"    T={steps:<5} batch {batch:<3} x{count:<3} speed-up "
                  f"{r['speedup_wall']:.2f}x wall, {r['speedup_cpu']:.2f}x CPU, "
                  f"{r['calls_ratio']:.2f}x fewer row evaluations; identical tokens: "
                  f"{r['identical']}", flush=True)
            if batch == B and count == n:
                runs[steps] = res
    return rows, runs


def speed_vs_ar(models, tasks, runs, args) -> List[Dict]:
    """Each AR model's samples, then MDLM with both samplers at each --steps."""
    L, n, B = args.length, args.samples, args.batch_size
    mdlm, mtask = models["mdlm_tiny"], tasks["mdlm_tiny"]
    eos, string = mtask.source_dictionary.eos(), mtask.source_dictionary.string
    rows = []
    for name in AR_MODELS:
        tok, stats = ar_generate(tasks[name], models[name], n, B, L, args.seed)
        rows.append({"model": name, "sampler": "fairseq sampling (incremental)", "steps": L,
                     **stats, **entropy_stats(tok, eos), "example": string(tok[0][:40])})
    for steps in args.steps:
        for sampler in SAMPLERS:
            tok, stats = runs[steps][sampler] if steps in runs else \
                mdlm_generate(mtask, mdlm, sampler, steps, n, B, L, args.seed)
            ent = entropy_stats(tok, eos)
            if abs(ent["entropy"] - stats["mean_unigram_entropy"]) > 1e-9:
                raise RuntimeError("entropy disagrees with the generator's statistics")
            rows.append({"model": "mdlm_tiny", "sampler": sampler, "steps": steps, **stats,
                         **ent, "example": string(tok[0][:40])})
    base = rows[0]                      # transformer_lm
    for r in rows:
        r["s_per_sample"], r["cpu_s_per_sample"] = r["wall_s"] / n, r["cpu_s"] / n
        r["x_transformer_lm_wall"] = r["wall_s"] / base["wall_s"]
        r["x_transformer_lm_cpu"] = r["cpu_s"] / base["cpu_s"]
        print(f"    {r['model']:<15} {r['sampler'][:10]:<10} T={r['steps']:<5} "
              f"{r['s_per_sample']:.3f} s/sample  entropy {r['entropy']:.3f}", flush=True)
    return rows


def crossover(points, target: float) -> Optional[float]:
    """The step count where MDLM's seconds per sample equals ``target``: log-log
    interpolation between the measured (steps, seconds) ``points``; None outside them."""
    for (t0, y0), (t1, y1) in zip(points, points[1:]):
        if (y0 - target) * (y1 - target) <= 0 and y0 != y1 and min(y0, y1, target) > 0:
            f = (math.log(target) - math.log(y0)) / (math.log(y1) - math.log(y0))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return None


def crossovers(speed: List[Dict]) -> List[Dict]:
    ar_rows = {r["model"]: r for r in speed if r["model"] in AR_MODELS}
    out = []
    for sampler in SAMPLERS:
        pts = sorted((r["steps"], r) for r in speed
                     if r["model"] == "mdlm_tiny" and r["sampler"] == sampler)
        for ar in AR_MODELS:
            for clock, key in (("wall", "s_per_sample"), ("CPU", "cpu_s_per_sample")):
                target = ar_rows[ar][key]
                xy = [(t, r[key]) for t, r in pts]
                where = ("MDLM faster at every T" if all(y < target for _, y in xy) else
                         "MDLM slower at every T" if all(y > target for _, y in xy) else "")
                if where:    # the cost per step of the nearest T, proportional in T
                    t_end, y_end = xy[0] if where.endswith("slower at every T") else xy[-1]
                    where += (f"; at the {t_end}-step cost per step it would cross at "
                              f"T ~ {target / (y_end / t_end):.1f}")
                out.append({"sampler": sampler, "ar": ar, "clock": clock,
                            "steps": crossover(xy, target), "where": where})
    return out


def crossover_lines(res) -> List[str]:
    out = []
    for c in res["crossover"]:
        if c["steps"] is not None:
            out.append(f"MDLM {c['sampler']} takes as long per sample as {c['ar']} at "
                       f"T ~ {c['steps']:.0f} steps ({c['clock']} time)")
        else:
            out.append(f"MDLM {c['sampler']} vs {c['ar']} ({c['clock']} time): no crossing "
                       f"within the measured steps ({c['where']})")
    return out


def notes(L: int) -> List[str]:
    return [
        "ddpm and ddpm_cache consume the same random stream (two (B, L) uniform tensors per "
        "step), so with the same seed they must give the same tokens: 'identical tokens'.",
        "ddpm_cache runs the network only on the rows that changed since their last "
        "evaluation (the others reuse their cached output). With L masked positions, a "
        "step of a T-step grid unmasks nothing in a row with probability about "
        "(1 - 1/T)^L (loglinear schedule), whatever the batch size; 'expected' is the "
        "number of row evaluations that formula predicts (it depends only on the "
        "schedule, T and L, not on the model or the batch).",
        "Rows whose evaluation is skipped still take part in the step (two uniform "
        "tensors, the transition of their masked positions), and a call on a subset of "
        "rows costs more per row than a full batch, so the wall-time speed-up is below "
        "the ratio of row evaluations; 'cache time in skipped work' estimates the share "
        "of ddpm_cache's time not spent on evaluations as 1 - (its evaluations x ddpm's "
        "seconds per evaluation) / its seconds.",
        f"AR: fairseq's SequenceGenerator (task.build_generator with sampling=True, beam 1, "
        f"min_len = max_len_b = {L}, max_len_a = 0), from the start token </s>, "
        f"incremental decoding. It makes {L + 1} decoder calls per batch: {L} sampled tokens "
        f"and the forced </s>. min_len forbids </s> inside the {L} tokens (fairseq uses it "
        f"as the stop symbol), while MDLM samples contain </s> between sentences; the "
        f"'entropy w/o </s>' column leaves </s> out of both. transformer_lm is loaded with "
        f"max_target_positions = {L + 1} (sinusoidal positions) so that the forced </s> "
        f"fits; mdlm_ar_tiny has 512 positions.",
        "CPU s is this process's user + system time over all threads (time.process_time): "
        "less sensitive than wall time to other jobs on the machine, though with several "
        "threads on a busy machine time spent spinning at OpenMP barriers counts too. "
        "'other load' is the share of all cores' time used by other processes during the "
        "run; wall times of runs with a high one are inflated.",
        "Entropy depends on training: the checkpoints' update counts are in the first table.",
    ]


# --------------------------------------------------------------------------- report

CACHE_HEAD = ["T", "batch", "samples", "row evaluations ddpm / cache", "expected",
              "wall s ddpm / cache", "CPU s ddpm / cache", "speed-up wall", "speed-up CPU",
              "evaluations ratio", "cache time in skipped work (est.)", "identical tokens",
              "other load"]
SPEED_HEAD = ["model", "sampler", "steps", "network calls", "s/sample (wall)",
              "CPU s/sample", "x transformer_lm (wall)", "x transformer_lm (CPU)",
              "entropy (nats)", "entropy w/o </s>", "other load"]


def cache_table_rows(rows) -> List[List[str]]:
    out = []
    for r in rows:
        d, c = r["ddpm"], r["ddpm_cache"]
        out.append([str(r["steps"]), str(r["batch"]), str(r["samples"]),
                    f"{d['row_calls']} / {c['row_calls']}",
                    f"{r['expected_calls_ddpm']:.0f} / {r['expected_calls_cache']:.0f}",
                    f"{d['wall_s']:.2f} / {c['wall_s']:.2f}",
                    f"{d['cpu_s']:.2f} / {c['cpu_s']:.2f}",
                    f"{r['speedup_wall']:.2f}x", f"{r['speedup_cpu']:.2f}x",
                    f"{r['calls_ratio']:.2f}x", pct(r["skipped_steps_share"]),
                    "yes" if r["identical"] else "NO",
                    f"{pct(d['other_load'])} / {pct(c['other_load'])}"])
    return out


def speed_table_rows(rows) -> List[List[str]]:
    return [[r["model"], r["sampler"], str(r["steps"]), str(r["network_calls"]),
             f"{r['s_per_sample']:.3f}", f"{r['cpu_s_per_sample']:.3f}",
             f"{r['x_transformer_lm_wall']:.2f}", f"{r['x_transformer_lm_cpu']:.2f}",
             f"{r['entropy']:.3f} ± {reporting.fmt(r['entropy_se'], '.3f')}",
             f"{r['entropy_no_eos']:.3f}", pct(r["other_load"])] for r in rows]


def expected_table(res) -> str:
    e = res["expected_calls_by_batch"]
    return md_table(["T"] + list(e["batches"]),
                    [[str(t)] + [f"{v:.0f}" for v in vals] for t, vals in e["rows"].items()])


def header_lines(res) -> List[str]:
    h = res["header"]
    lines = ["# Sampling speed: MDLM `ddpm_cache` vs `ddpm`, and MDLM vs fairseq autoregressive "
             "sampling", "", "```", h["command"], "```", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in h["machine"].items()]
    lines += [f"| load average at end | {h['load_average_at_end']} |",
              f"| total wall time | {h['total_wall_s']:.0f} s |", f"| setup | {h['setup']} |",
              "", "## Checkpoints", "", "| model | path | arch | params | updates | "
              "valid loss when saved (bits) |", "|---|---|---|---:|---:|---:|"]
    return lines + [f"| {name} | `{c['path']}` | {c['arch']} | {c['params']:,} | "
                    f"{c['num_updates']} | {reporting.fmt(c['valid_loss_bits'], '.3f')} |"
                    for name, c in res["checkpoints"].items()]


def markdown_report(res) -> str:
    s = res["settings"]
    lines = header_lines(res) + [
        "", "## 1. `ddpm_cache` vs `ddpm` (same checkpoint, seed and samples)", "",
        "speed-up = ddpm / ddpm_cache; expected calls: the schedule-only formula "
        "(`expected_calls`); other load: share of all cores used by other processes "
        "during the run.", "", md_table(CACHE_HEAD, cache_table_rows(res["cache_vs_ddpm"])),
        "", f"Expected row evaluations per sample, any batch size (L = {s['length']}):", "",
        expected_table(res), "",
        f"## 2. MDLM vs autoregressive sampling ({s['samples']} samples of "
        f"{s['length']} tokens, batch {s['batch_size']})", "",
        "x transformer_lm = seconds per sample / transformer_lm's seconds per sample "
        "(> 1: slower than fairseq's AR sampling). Entropy: mean over samples of the "
        "unigram entropy of each sample (± standard error).", "",
        md_table(SPEED_HEAD, speed_table_rows(res["speed_vs_ar"])), ""]
    d = res.get("data_entropy") or {}
    if d:
        lines += [f"Reference: PTB `{d['split']}` split in {d['blocks']} blocks of "
                  f"{s['length']} tokens: unigram entropy {d['entropy']:.3f} nats "
                  f"({d['entropy_no_eos']:.3f} without `</s>`).", ""]
    lines += [f"- {x}" for x in crossover_lines(res)] + [""]
    lines += ["![sampling speed](sampling_speed.png)", "", "## Notes", ""]
    return "\n".join(lines + [f"- {n}" for n in res["notes"]] + [""])


def plot(res, path: str) -> None:
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter
    speed, s = res["speed_vs_ar"], res["settings"]
    fig, (ax1, ax2) = reporting.pyplot().subplots(1, 2, figsize=(11.5, 4.4))
    for sampler in SAMPLERS:
        pts = [r for r in speed if r["model"] == "mdlm_tiny" and r["sampler"] == sampler]
        xs, colour = [r["steps"] for r in pts], COLOURS[sampler]
        ax1.plot(xs, [r["s_per_sample"] for r in pts], "o-", color=colour,
                 label=f"MDLM {sampler} (wall)")
        ax1.plot(xs, [r["cpu_s_per_sample"] for r in pts], "x:", color=colour,
                 label=f"MDLM {sampler} (CPU)")
        ax2.errorbar(xs, [r["entropy"] for r in pts], yerr=[r["entropy_se"] or 0 for r in pts],
                     fmt="o-" if sampler == "ddpm" else "s--", color=colour,
                     label=f"MDLM {sampler}", capsize=3, alpha=0.8)
    for name in AR_MODELS:
        r = next(r for r in speed if r["model"] == name)
        ax1.axhline(r["s_per_sample"], color=COLOURS[name], ls="-",
                    label=f"{name} (AR, wall) {r['s_per_sample']:.3f} s")
        ax1.axhline(r["cpu_s_per_sample"], color=COLOURS[name], ls=":", label=f"{name} (AR, CPU)")
        ax2.axhline(r["entropy"], color=COLOURS[name], label=f"{name} (AR)")
    d = res.get("data_entropy") or {}
    if d:
        ax2.axhline(d["entropy"], color="black", ls="--", label=f"PTB {d['split']} data")
    ax1.set(xscale="log", yscale="log", xlabel="MDLM diffusion steps T",
            ylabel="seconds per sample")
    ax1.set_title(f"{s['samples']} samples x {s['length']} tokens, batch {s['batch_size']}",
                  fontsize=10)
    ax2.set(xscale="log", xlabel="MDLM diffusion steps T",
            ylabel="mean unigram entropy per sample (nats)")
    ax2.set_title("sample diversity", fontsize=10)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(FixedLocator(s["steps"]))
        ax.xaxis.set_major_formatter(FixedFormatter([str(t) for t in s["steps"]]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    m = res["header"]["machine"]
    reporting.save_figure(fig, path, f"{m['cpu']}, {m['torch_threads']} thread(s), torch "
                          f"{m['torch']}, load {m['load_average_at_start'][0]}")


def write_outputs(res, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_report(res))
    plot(res, os.path.join(out_dir, "sampling_speed.png"))


# --------------------------------------------------------------------------- main

def header(args, data_dir: str, argv) -> Dict[str, object]:
    m = reporting.machine("cpu", args.threads)
    keys = ("date", "host", "platform", "cpu", "cpu_cores", "cpu_cores_usable", "torch_threads",
            "load_average", "device", "python", "torch", "fairseq", "mdlm_plugin", "git")
    machine = {("load_average_at_start" if k == "load_average" else k): m[k] for k in keys}
    command = shlex.join([sys.executable] + sys.argv) if argv is None else \
        shlex.join([sys.executable, __file__] + list(argv))
    setup = (f"{args.samples} unconditional samples x {args.length} tokens per configuration, "
             f"batch {args.batch_size}, seed {args.seed}, temperature 1, no top-k/top-p, "
             f"{args.threads} torch thread(s); the cache comparison also "
             f"{args.single_samples} sample(s) one at a time")
    return {"command": command, "machine": machine, "data": data_dir, "setup": setup}


def measure_all(args, data_dir: str) -> Dict[str, object]:
    import torch
    from fairseq import utils
    ckpts = {name: ensure_checkpoint(name, resolve(path), args, data_dir) for name, path in (
        ("mdlm_tiny", args.mdlm_ckpt), ("transformer_lm", args.transformer_lm_ckpt),
        ("mdlm_ar_tiny", args.ar_ckpt))}
    for name in ("fairseq", "mdlm_plugin", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    utils.import_user_module(argparse.Namespace(user_dir=recipes.PLUGIN))
    torch.set_num_threads(args.threads)
    models, tasks = load_models(ckpts, data_dir, args.length)
    mdlm, mtask = models["mdlm_tiny"], tasks["mdlm_tiny"]
    # warm-up: one short run of each sampler and each AR model (first-call allocations)
    for sampler in SAMPLERS:
        mdlm_generate(mtask, mdlm, sampler, 4, min(2, args.batch_size), args.batch_size,
                      args.length, args.seed)
    for name in AR_MODELS:
        ar_generate(tasks[name], models[name], min(2, args.batch_size), args.batch_size,
                    args.length, args.seed)
    print("\n[1] ddpm_cache vs ddpm", flush=True)
    cache, runs = cache_vs_ddpm(mdlm, mtask, args)
    print("\n[2] MDLM vs autoregressive sampling", flush=True)
    speed = speed_vs_ar(models, tasks, runs, args)
    by_batch = list(SAMPLERS)     # expected row evaluations per sample
    exp_rows = {t: [expected_calls(mtask.schedule, t, args.length, name) for name in by_batch]
                for t in sorted(set(args.cache_steps) | set(args.steps))}
    return {"checkpoints": ckpts, "cache_vs_ddpm": cache, "speed_vs_ar": speed,
            "expected_calls_by_batch": {"batches": by_batch, "rows": exp_rows},
            "data_entropy": data_entropy(data_dir, "test", args.length,
                                         mtask.source_dictionary.eos()),
            "crossover": crossovers(speed), "notes": notes(args.length)}


def main(argv=None):
    args = parse_args(argv)
    out_dir = resolve(args.output_dir)
    if args.report_only:
        with open(os.path.join(out_dir, "results.json")) as f:
            return write_outputs(json.load(f), out_dir)
    data_dir = resolve(args.data)
    if not os.path.isfile(os.path.join(data_dir, "dict.txt")):
        sys.exit(f"error: {data_dir} has no dict.txt (make it with bash examples/ptb/prepare.sh)")
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    h = header(args, data_dir, argv)
    print(f"command: {h['command']}\nsetup: {h['setup']}", flush=True)
    res = {"header": h, "settings": vars(args), **measure_all(args, data_dir)}
    h["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    h["total_wall_s"] = time.perf_counter() - t_start
    res["ratios"] = {
        "ddpm_over_cache_wall": {f"T={r['steps']},batch={r['batch']}": r["speedup_wall"]
                                 for r in res["cache_vs_ddpm"]},
        "ddpm_over_cache_cpu": {f"T={r['steps']},batch={r['batch']}": r["speedup_cpu"]
                                for r in res["cache_vs_ddpm"]},
        "mdlm_over_transformer_lm_wall": {f"{r['model']}:{r['sampler']}:T={r['steps']}":
                                          r["x_transformer_lm_wall"] for r in res["speed_vs_ar"]}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    write_outputs(res, out_dir)
    print(markdown_report(res).split("![sampling speed]")[0])
    print(f"\ntotal {h['total_wall_s']:.0f} s; wrote {out_dir}/results.json, results.md, "
          f"sampling_speed.png")


if __name__ == "__main__":
    main()
