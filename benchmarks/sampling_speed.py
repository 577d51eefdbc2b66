#!/usr/bin/env python
"""Sampling speed: MDLM ``ddpm_cache`` vs ``ddpm`` (``cache_vs_ddpm``: same checkpoint, seed
and samples at each batch size; time, row evaluations against the schedule-only
expectation, identical tokens and scores), and MDLM at several step counts vs fairseq's
autoregressive sampling (``speed_vs_ar``), in one process. A missing checkpoint is trained
first (``mdlm_plugin.recipes``). Details and flags: benchmarks/README.md.

    python benchmarks/sampling_speed.py [DATA_DIR] [--samples 4] [--threads N]
    python benchmarks/sampling_speed.py --report-only [--output-dir DIR]
"""
import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import measure  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402
from mdlm_plugin.generative_eval import batches  # noqa: E402
from mdlm_plugin.reporting import COLOURS, column_table, md_table, pct  # noqa: E402

TRAIN_DIR = os.path.join(tempfile.gettempdir(), "mdlm_sampling_speed")
SAMPLERS = ("ddpm", "ddpm_cache")
AR_MODELS = ("transformer_lm", "mdlm_ar_tiny")
FAMILY = {"mdlm_tiny": "mdlm", "mdlm_ar_tiny": "mdlm_ar", "transformer_lm": "transformer_lm",
          "bd3_tiny": "mdlm"}
CORES = reporting.usable_cores()
# see benchmarks/README.md for what each changes
FLAGS = {"--mdlm-ckpt": (str, "checkpoints/ptb_mdlm_tiny/checkpoint_best.pt", "mdlm_tiny"),
         "--ar-ckpt": (str, f"{TRAIN_DIR}/mdlm_ar_tiny/checkpoint_last.pt", "mdlm_ar_tiny"),
         "--transformer-lm-ckpt": (str, f"{TRAIN_DIR}/transformer_lm/checkpoint_last.pt",
                                   "transformer_lm (4 x 256, 4 heads, FFN 1024)"),
         "--train-dir": (str, TRAIN_DIR, "where missing checkpoints are trained"),
         "--train-updates": (int, 200, "updates of a missing checkpoint"),
         "--length": (int, 128, "tokens per sample L (the MDLM window)"),
         "--samples": (int, 4, "unconditional samples per configuration"),
         "--batch-size": (int, 0, "samples per generate call (0: all in one)"),
         "--steps": ([int], [16, 32, 64, 128, 256, 1000], "MDLM steps vs AR"),
         "--samplers": ([str], list(SAMPLERS), "MDLM samplers vs AR (issue 11: "
                        "ddpm_cache first_hitting)"),
         "--cache-steps": ([int], [1000, 0], "steps of ddpm_cache vs ddpm (0: T = L)"),
         "--batch-sizes": ([int], None, "batch sizes of ddpm_cache vs ddpm, B samples "
                           "each (1: --single-samples); default --batch-size and 1"),
         "--single-samples": (int, 2, "samples one at a time in ddpm_cache vs ddpm"),
         "--threads": (int, CORES, "torch threads for sampling"),
         "--train-threads": (int, CORES, "OMP_NUM_THREADS of fairseq-train"),
         "--long-length": (int, 0, "block diffusion vs MDLM semi-AR vs AR at this "
                           "many tokens per sample (issue 10: 512; 0: skip)"),
         "--long-samples": (int, 2, "samples of --long-length tokens per model"),
         "--block-ckpt": (str, f"{TRAIN_DIR}/bd3_tiny/checkpoint_last.pt", "BD3 model"),
         "--block-size": (int, 16, "L' of a BD3 model trained here; MDLM's semi-AR stride"),
         "--block-steps": (int, 16, "steps per block (MDLM: per window of L' new tokens)"),
         "--long-sampler": (str, "ddpm_cache", "sampler of the long samples"),
         "--seed": (int, 1, None),
         "--output-dir": (str, "benchmarks/results/sampling", "repo-relative"),
         "--no-train": (bool, False, "a missing checkpoint is an error"),
         "--report-only": (bool, False, "only rewrite results.md and the plot from "
                           "--output-dir/results.json")}


def parse_args(argv=None):
    p = measure.parser(__doc__, FLAGS, ("data-bin/ptb", "the models' data"))
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        args.batch_size = args.samples
    if args.samples < 1 or args.length < 2 or args.threads < 1:
        p.error("--samples >= 1, --length >= 2 and --threads >= 1 are required")
    if any(t < 1 for t in args.steps + (args.batch_sizes or [])) or \
            any(t < 0 for t in args.cache_steps):
        p.error("--steps and --batch-sizes must be positive (--cache-steps: positive, or 0 "
                "for T = L)")
    from mdlm_plugin.diffusion.samplers import SAMPLERS as KNOWN
    if set(args.samplers) - set(KNOWN):
        p.error(f"--samplers: choose among {', '.join(KNOWN)}")
    args.cache_steps = sorted({t or args.length for t in args.cache_steps}, reverse=True)
    args.steps = sorted(set(args.steps))
    return args


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
                  "bd3_tiny": {"model_extra": ["--weight-decay", "0.01", "--block-size",
                                               args.block_size]},
                  "transformer_lm": {"size": recipes.ARCH_SIZES["tiny"], "dropout": 0.1}}
    return recipes.train_command(FAMILY[model], data_dir, protocol, device=None,
                                 **model_args.get(model, {}))


def ensure_checkpoint(model: str, path: str, args, data_dir: str) -> Dict[str, object]:
    """The checkpoint at ``path``, or one trained now into --train-dir."""
    if os.path.isfile(path):
        return {"path": path, "trained_here": False}
    save_dir = os.path.join(reporting.in_repo(args.train_dir), model)
    trained = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.isfile(trained):
        print(f"{model}: {path} missing, using {trained} (trained earlier by this benchmark)")
        return {"path": trained, "trained_here": False}
    if args.no_train:
        sys.exit(f"error: {model} checkpoint {path} not found (and --no-train)")
    os.makedirs(save_dir, exist_ok=True)
    cmd, log = train_command(model, args, data_dir, save_dir), os.path.join(save_dir, "train.log")
    print(f"{model}: {path} missing; training {args.train_updates} updates "
          f"(log {log}):\n    $ {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, **measure.thread_env(args.train_threads))
    measure.run_logged(cmd, log, env, REPO, timeout=24 * 3600, what=f"training {model}")
    if not os.path.isfile(trained):
        sys.exit(f"error: training {model} wrote no {trained} (log {log})")
    return {"path": trained, "trained_here": True, "train_command": shlex.join(cmd)}


def load_models(ckpts: Dict, data_dir: str, L: int, longest: int):
    """(models, tasks) with fairseq's loader; transformer_lm gets one more position than
    the longest sample, for the </s> SequenceGenerator forces after it."""
    from mdlm_plugin.generative_eval import load_checkpoint
    models, tasks = {}, {}
    for name, c in ckpts.items():
        over = {"max_target_positions": longest + 1} if name == "transformer_lm" else None
        model, task, facts = load_checkpoint(c["path"], data_dir, over)
        if FAMILY[name] == "mdlm" and not callable(getattr(model, "denoiser", None)) or \
                (name == "bd3_tiny") != bool(getattr(model, "block_size", None)):
            sys.exit(f"error: the {name} checkpoint {c['path']} is not a {name} model")
        if FAMILY[name] == "mdlm" and facts["tokens_per_sample"] != L:
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
                  seed: int, stride: int = 0):
    """n unconditional samples of ``length`` tokens through task.build_generator:
    (tokens, their scores, statistics)."""
    from mdlm_plugin.generative_eval import mdlm_samples
    with measure.Meter() as m:
        tokens, st = mdlm_samples(task, model, n, length, steps, sampler, seed, batch, stride)
    assert tokens.shape == (n, length), tokens.shape
    return tokens, st.pop("scores"), {**m.as_dict(), "generator_seconds": st.pop("seconds"), **st}


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


def mean_se(xs: List[float]):
    n, mu = len(xs), sum(xs) / len(xs)
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None)


def entropy_stats(tokens, eos: int) -> Dict[str, object]:
    """Mean unigram entropy of the rows (± its standard error), and without </s>."""
    from mdlm_plugin.diffusion.samplers import unigram_entropy
    mu, se = mean_se([unigram_entropy(row.unsqueeze(0)) for row in tokens])
    mu_ne, se_ne = mean_se([unigram_entropy(row.unsqueeze(0), (eos,)) for row in tokens])
    return {"entropy": mu, "entropy_se": se, "entropy_no_eos": mu_ne, "entropy_no_eos_se": se_ne}


def data_entropy(data_dir: str, split: str, length: int, eos: int) -> Dict[str, object]:
    """Reference: the split's consecutive blocks of ``length`` tokens (</s> included)."""
    from mdlm_plugin.generative_eval import data_blocks
    try:
        blocks = data_blocks(data_dir, split, length)
    except FileNotFoundError:
        return {}
    return {"split": split, "blocks": blocks.size(0), **entropy_stats(blocks, eos)}


def expected_calls(schedule, steps: int, positions: int, sampler: str,
                   t_min: float = 1e-5) -> float:
    """Expected denoiser calls of ``samplers.sample`` from ``positions`` masked positions.
    A position leaves the mask independently, with a probability set by the schedule
    only: after step k it is still masked with probability Q[k+1] = m(t_{k+1}) / m(t_0).
    ddpm calls the network at each step that starts with a mask; ddpm_cache at the first
    step and after a step that unmasked a position, when masks are left."""
    import torch
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    m = schedule.mask_prob(ts).double()
    q, n = (m / m[0]).clamp(0.0, 1.0), float(positions)

    def none(p):             # P(no position has an event of probability p)
        return torch.exp(n * torch.log1p(-p.clamp(max=1.0 - 1e-300)))

    if sampler == "ddpm":
        return float((1.0 - none(q)).sum())
    a = (q[:-1] - q[1:]).clamp(min=0.0)       # unmasked at step k-1, for k = 1..steps
    b, c = q[1:], 1.0 - q[:-1]                # still masked after / unmasked before step k-1
    both = 1.0 - none(a) - none(b) + torch.exp(n * torch.log(c.clamp(min=1e-300)))
    return float(1.0 + both.clamp(min=0.0).sum())


# --------------------------------------------------------------------------- measurements

def cache_row(res: Dict, steps: int, batch: int, count: int, schedule, L: int) -> Dict:
    """One row of the cache comparison from the two samplers' (tokens, scores, stats)."""
    import torch
    (td, pd, sd), (tc, pc, sc) = res["ddpm"], res["ddpm_cache"]
    row = {"steps": steps, "batch": batch, "samples": count, "identical": bool(torch.equal(td, tc)),
           "identical_scores": bool(torch.equal(pd, pc)),
           "max_score_difference": float((pd - pc).abs().max()), "ddpm": sd, "ddpm_cache": sc,
           # per row, the expected evaluations are those of one sequence of L positions
           "expected_calls_ddpm": count * expected_calls(schedule, steps, L, "ddpm"),
           "expected_calls_cache": count * expected_calls(schedule, steps, L, "ddpm_cache"),
           "speedup_wall": sd["wall_s"] / sc["wall_s"], "speedup_cpu": sd["cpu_s"] / sc["cpu_s"],
           "calls_ratio": sd["row_calls"] / max(1, sc["row_calls"])}
    # ddpm's time per row evaluation x ddpm_cache's evaluations is what they cost; the rest
    # of ddpm_cache's time goes to the work of the steps it skipped
    per_call = sd["wall_s"] / max(1, sd["row_calls"])
    row["skipped_steps_share"] = max(0.0, 1.0 - sc["row_calls"] * per_call / sc["wall_s"])
    return row


def cache_modes(args) -> List[tuple]:
    """(samples, batch size) of the cache comparison."""
    if args.batch_sizes:
        return [(max(1, args.single_samples) if b == 1 else b, b) for b in args.batch_sizes]
    single = args.single_samples > 0 and args.batch_size > 1
    return [(args.samples, args.batch_size)] + ([(args.single_samples, 1)] if single else [])


def cache_vs_ddpm(mdlm, mtask, args):
    """``ddpm_cache`` vs ``ddpm`` at each --cache-steps and batch size; the runs of
    --samples in batches of --batch-size are reused by :func:`speed_vs_ar`."""
    rows, runs = [], {}
    for steps in args.cache_steps:
        for count, batch in cache_modes(args):
            res = {s: mdlm_generate(mtask, mdlm, s, steps, count, batch, args.length, args.seed)
                   for s in SAMPLERS}
            rows.append(cache_row(res, steps, batch, count, mtask.schedule, args.length))
            r = rows[-1]
            print(f"    T={steps:<5} batch {batch:<3} x{count:<3} speed-up "
                  f"{r['speedup_wall']:.2f}x wall, {r['speedup_cpu']:.2f}x CPU, "
                  f"{r['calls_ratio']:.2f}x fewer row evaluations; identical tokens: "
                  f"{r['identical']}, scores: {r['identical_scores']}", flush=True)
            if (count, batch) == (args.samples, args.batch_size):
                runs[steps] = res
    return rows, runs


def speed_vs_ar(models, tasks, runs, args) -> List[Dict]:
    """Each AR model's samples, then MDLM with each of --samplers at each --steps."""
    L, n, B = args.length, args.samples, args.batch_size
    mdlm, mtask = models["mdlm_tiny"], tasks["mdlm_tiny"]
    eos, string = mtask.source_dictionary.eos(), mtask.source_dictionary.string
    rows = []
    for name in AR_MODELS:
        tok, stats = ar_generate(tasks[name], models[name], n, B, L, args.seed)
        rows.append({"model": name, "sampler": "fairseq sampling (incremental)", "steps": L,
                     **stats, **entropy_stats(tok, eos), "example": string(tok[0][:40])})
    for steps in args.steps:
        for sampler in args.samplers:
            tok, _, stats = runs.get(steps, {}).get(sampler) or \
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
    """Per MDLM sampler, AR model and clock: where MDLM's time per sample crosses the AR
    model's, or (outside the measured steps) where the nearest cost per step would."""
    ar_rows, out = {r["model"]: r for r in speed if r["model"] in AR_MODELS}, []
    for sampler, ar in ((s, a) for s in mdlm_samplers(speed) for a in AR_MODELS):
        for clock, key in (("wall", "s_per_sample"), ("CPU", "cpu_s_per_sample")):
            target = ar_rows[ar][key]
            xy = sorted((r["steps"], r[key]) for r in speed
                        if r["model"] == "mdlm_tiny" and r["sampler"] == sampler)
            slower, faster = all(y > target for _, y in xy), all(y < target for _, y in xy)
            where = "MDLM faster at every T" if faster else \
                "MDLM slower at every T" if slower else ""
            if where:
                t_end, y_end = xy[0] if slower else xy[-1]
                where += (f"; at the {t_end}-step cost per step it would cross at "
                          f"T ~ {target / (y_end / t_end):.1f}")
            out.append({"sampler": sampler, "ar": ar, "clock": clock,
                        "steps": crossover(xy, target), "where": where})
    return out


def long_run(name: str, models, tasks, args):
    """(tokens, statistics) of --long-samples of --long-length tokens from one model."""
    n, N = args.long_samples, args.long_length
    if name == "transformer_lm":
        return ar_generate(tasks[name], models[name], n, n, N, args.seed)
    stride = args.block_size if name == "mdlm_tiny" else 0     # MDLM: semi-AR
    tokens, _, st = mdlm_generate(tasks[name], models[name], args.long_sampler, args.block_steps,
                                  n, n, N, args.seed, stride)
    return tokens, st


def long_samples(models, tasks, args) -> List[Dict]:
    """The BD3 model block by block with its cache, MDLM semi-autoregressively (stride L',
    the same steps per token) and transformer_lm with fairseq's incremental sampling;
    generative perplexity under mdlm_ar_tiny (512 positions)."""
    from mdlm_plugin.generative_eval import generative_perplexity
    n, N = args.long_samples, args.long_length
    methods = {"bd3_tiny": "block diffusion, KV cache",
               "mdlm_tiny": f"semi-AR, stride {args.block_size}",
               "transformer_lm": "fairseq sampling (incremental)"}
    rows = []
    for name, method in methods.items():
        tokens, st = long_run(name, models, tasks, args)
        ppl = generative_perplexity(models["mdlm_ar_tiny"], tokens) if N <= 512 else {}
        per_token = None if name == "transformer_lm" else args.block_steps / args.block_size
        rows.append({"model": name, "method": method, "length": N, "samples": n,
                     "steps_per_token": per_token, **st, "s_per_sample": st["wall_s"] / n,
                     "cpu_s_per_sample": st["cpu_s"] / n, "gen_ppl": ppl.get("ppl"),
                     "gen_ppl_se": ppl.get("ppl_se")})
        print(f"    {name:<15} {N} tokens: {rows[-1]['s_per_sample']:.2f} s/sample, "
              f"{st['network_calls']} calls, gen. ppl {reporting.fmt(ppl.get('ppl'))}", flush=True)
    for r in rows:
        r["x_transformer_lm_wall"] = r["wall_s"] / rows[-1]["wall_s"]
    return rows


NOTES = [
    "ddpm and ddpm_cache consume the same random stream (two (B, L) uniform tensors per "
    "step), so with the same seed they must give the same tokens and scores; 'expected' "
    "row evaluations depend only on the schedule, T and L (`expected_calls`).",
    "'cache time in skipped work' = 1 - (ddpm_cache's evaluations x ddpm's seconds per "
    "evaluation) / ddpm_cache's seconds: skipped rows still take part in each step.",
    "AR: fairseq's SequenceGenerator (sampling, beam 1, min_len = max_len_b = {L}) from </s> "
    "with incremental decoding, {L1} decoder calls per batch; min_len forbids </s> inside the "
    "sample ('entropy w/o </s>' leaves it out of both); transformer_lm is loaded with "
    "max_target_positions = {L1}.",
    "CPU s: this process's user + system time; 'other load': the share of all cores' time "
    "other processes used (wall times of runs with a high one are inflated). Entropy depends "
    "on training (update counts in the first table). More: benchmarks/README.md.",
]


# --------------------------------------------------------------------------- report

def _pair(key: str, spec: str):
    return lambda r: f"{format(r['ddpm'][key], spec)} / {format(r['ddpm_cache'][key], spec)}"


CACHE_COLUMNS = [
    ("T", lambda r: str(r["steps"])), ("batch", lambda r: str(r["batch"])),
    ("samples", lambda r: str(r["samples"])),
    ("row evaluations ddpm / cache", _pair("row_calls", "d")),
    ("expected", lambda r: f"{r['expected_calls_ddpm']:.0f} / {r['expected_calls_cache']:.0f}"),
    ("wall s ddpm / cache", _pair("wall_s", ".2f")), ("CPU s ddpm / cache", _pair("cpu_s", ".2f")),
    ("speed-up wall", lambda r: f"{r['speedup_wall']:.2f}x"),
    ("speed-up CPU", lambda r: f"{r['speedup_cpu']:.2f}x"),
    ("evaluations ratio", lambda r: f"{r['calls_ratio']:.2f}x"),
    ("cache time in skipped work (est.)", lambda r: pct(r["skipped_steps_share"])),
    ("identical tokens", lambda r: "yes" if r["identical"] else "NO"),
    ("identical scores", lambda r: "yes" if r["identical_scores"] else
     f"NO (max diff {r['max_score_difference']:.2g})"),
    ("other load", lambda r: f"{pct(r['ddpm']['other_load'])} / "
                             f"{pct(r['ddpm_cache']['other_load'])}")]
SPEED_COLUMNS = [
    ("model", lambda r: r["model"]), ("sampler", lambda r: r["sampler"]),
    ("steps", lambda r: str(r["steps"])), ("network calls", lambda r: str(r["network_calls"])),
    ("s/sample (wall)", lambda r: f"{r['s_per_sample']:.3f}"),
    ("CPU s/sample", lambda r: f"{r['cpu_s_per_sample']:.3f}"),
    ("x transformer_lm (wall)", lambda r: f"{r['x_transformer_lm_wall']:.2f}"),
    ("x transformer_lm (CPU)", lambda r: f"{r['x_transformer_lm_cpu']:.2f}"),
    ("entropy (nats)", lambda r: f"{r['entropy']:.3f} ± {reporting.fmt(r['entropy_se'], '.3f')}"),
    ("entropy w/o </s>", lambda r: f"{r['entropy_no_eos']:.3f}"),
    ("other load", lambda r: pct(r["other_load"]))]
LONG_COLUMNS = SPEED_COLUMNS[:1] + [
    ("method", lambda r: r["method"]),
    ("steps per token", lambda r: reporting.fmt(r["steps_per_token"], ".2f", "1 (AR)")),
    ("network calls", lambda r: str(r["network_calls"])),
    ("row evaluations", lambda r: str(r.get("row_calls", r["network_calls"] * r["samples"]))),
    ("s/sample (wall)", lambda r: f"{r['s_per_sample']:.2f}"),
    ("CPU s/sample", lambda r: f"{r['cpu_s_per_sample']:.2f}"),
    ("x transformer_lm (wall)", lambda r: f"{r['x_transformer_lm_wall']:.2f}"),
    ("gen. perplexity", lambda r: f"{reporting.fmt(r['gen_ppl'])} ± "
                                  f"{reporting.fmt(r['gen_ppl_se'])}")]


def expected_table(res) -> str:
    e = res["expected_calls_by_batch"]
    return md_table(["T"] + list(e["batches"]),
                    [[str(t)] + [f"{v:.0f}" for v in vals] for t, vals in e["rows"].items()])


def crossover_lines(res) -> List[str]:
    return [f"MDLM {c['sampler']} takes as long per sample as {c['ar']} at T ~ {c['steps']:.0f} "
            f"steps ({c['clock']} time)" if c["steps"] is not None else
            f"MDLM {c['sampler']} vs {c['ar']} ({c['clock']} time): no crossing within the "
            f"measured steps ({c['where']})" for c in res["crossover"]]


def header_lines(res) -> List[str]:
    h = res["header"]
    lines = ["# Sampling speed: MDLM `ddpm_cache` vs `ddpm`, and MDLM vs fairseq autoregressive "
             "sampling", "", "```", h["command"], "```", "",
             reporting.machine_table(h["machine"], list(h["machine"])),
             f"| load average at end | {h['load_average_at_end']} |",
             f"| total wall time | {h['total_wall_s']:.0f} s |", f"| setup | {h['setup']} |",
             "", "## Checkpoints", ""]
    return lines + [md_table(
        ["model", "path", "arch", "params", "updates", "valid loss when saved (bits)"],
        [[name, f"`{c['path']}`", c["arch"], f"{c['params']:,}", c["num_updates"],
          reporting.fmt(c["valid_loss_bits"], ".3f")] for name, c in res["checkpoints"].items()],
        align="lllrrr")]


def markdown_report(res) -> str:
    s, d = res["settings"], res.get("data_entropy") or {}
    lines = header_lines(res) + [
        "", "## 1. `ddpm_cache` vs `ddpm` (same checkpoint, seed and samples)", "",
        "speed-up = ddpm / ddpm_cache; expected calls: the schedule-only formula "
        "(`expected_calls`); other load: share of all cores used by other processes "
        "during the run.", "", column_table(CACHE_COLUMNS, res["cache_vs_ddpm"]),
        "", f"Expected row evaluations per sample, any batch size (L = {s['length']}):", "",
        expected_table(res), "",
        f"## 2. MDLM vs autoregressive sampling ({s['samples']} samples of "
        f"{s['length']} tokens, batch {s['batch_size']})", "",
        "x transformer_lm = seconds per sample / transformer_lm's seconds per sample "
        "(> 1: slower than fairseq's AR sampling). Entropy: mean over samples of the "
        "unigram entropy of each sample (± standard error).", "",
        column_table(SPEED_COLUMNS, res["speed_vs_ar"]), ""]
    if d:
        lines += [f"Reference: PTB `{d['split']}` split in {d['blocks']} blocks of "
                  f"{s['length']} tokens: unigram entropy {d['entropy']:.3f} nats "
                  f"({d['entropy_no_eos']:.3f} without `</s>`).", ""]
    lines += [f"- {x}" for x in crossover_lines(res)] + [""]
    if res.get("long_samples"):
        r = res["long_samples"][0]
        lines += [f"## 3. {r['samples']} samples of {r['length']} tokens: block diffusion vs MDLM "
                  f"semi-AR vs AR", "", "Generative perplexity under mdlm_ar_tiny (± standard "
                  "error); steps per token: diffusion steps per block (or window) / new tokens "
                  "per block.", "", column_table(LONG_COLUMNS, res["long_samples"]), ""]
    lines += ["![sampling speed](sampling_speed.png)", "", "## Notes", ""]
    return "\n".join(lines + [f"- {n}" for n in res["notes"]] + [""])


def mdlm_samplers(speed) -> List[str]:
    return list(dict.fromkeys(r["sampler"] for r in speed if r["model"] == "mdlm_tiny"))


def plot_samplers(ax1, ax2, speed) -> None:
    for sampler in mdlm_samplers(speed):
        pts = [r for r in speed if r["model"] == "mdlm_tiny" and r["sampler"] == sampler]
        xs, colour = [r["steps"] for r in pts], COLOURS.get(sampler)
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


def plot(res, path: str) -> None:
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter
    s, d = res["settings"], res.get("data_entropy") or {}
    fig, (ax1, ax2) = reporting.pyplot().subplots(1, 2, figsize=(11.5, 4.4))
    plot_samplers(ax1, ax2, res["speed_vs_ar"])
    if d:
        ax2.axhline(d["entropy"], color="black", ls="--", label=f"PTB {d['split']} data")
    ax1.set(xscale="log", xlabel="MDLM diffusion steps T", ylabel="seconds per sample")
    reporting.scale(ax1, "y", [y for line in ax1.get_lines() for y in line.get_ydata()])
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
    reporting.write_text(os.path.join(out_dir, "results.md"), markdown_report(res))
    plot(res, os.path.join(out_dir, "sampling_speed.png"))


# --------------------------------------------------------------------------- main

def header(args, data_dir: str, argv) -> Dict[str, object]:
    machine = {("load_average_at_start" if k == "load_average" else k): v
               for k, v in reporting.machine("cpu", args.threads).items() if k != "gpu"}
    batches_ = ", ".join(f"{b}" for _, b in cache_modes(args))
    setup = (f"{args.samples} unconditional samples x {args.length} tokens per configuration, "
             f"batch {args.batch_size}, seed {args.seed}, temperature 1, no top-k/top-p, "
             f"{args.threads} torch thread(s); the cache comparison at batch sizes {batches_}")
    return {"command": reporting.invocation(__file__, argv), "machine": machine,
            "data": data_dir, "setup": setup}


def measure_all(args, data_dir: str) -> Dict[str, object]:
    import torch
    from fairseq import utils
    paths = [("mdlm_tiny", args.mdlm_ckpt), ("transformer_lm", args.transformer_lm_ckpt),
             ("mdlm_ar_tiny", args.ar_ckpt)] + ([("bd3_tiny", args.block_ckpt)] if
                                                args.long_length else [])
    ckpts = {name: ensure_checkpoint(name, reporting.in_repo(path), args, data_dir)
             for name, path in paths}
    for name in ("fairseq", "mdlm_plugin", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    utils.import_user_module(argparse.Namespace(user_dir=recipes.PLUGIN))
    torch.set_num_threads(args.threads)
    models, tasks = load_models(ckpts, data_dir, args.length, max(args.length, args.long_length))
    mdlm, mtask, warm = models["mdlm_tiny"], tasks["mdlm_tiny"], min(2, args.batch_size)
    for sampler in dict.fromkeys(SAMPLERS + tuple(args.samplers)):   # first-call allocations
        mdlm_generate(mtask, mdlm, sampler, 4, warm, args.batch_size, args.length, args.seed)
    for name in AR_MODELS:
        ar_generate(tasks[name], models[name], warm, args.batch_size, args.length, args.seed)
    print("\n[1] ddpm_cache vs ddpm", flush=True)
    cache, runs = cache_vs_ddpm(mdlm, mtask, args)
    print("\n[2] MDLM vs autoregressive sampling", flush=True)
    speed = speed_vs_ar(models, tasks, runs, args)
    if args.long_length:
        print("\n[3] block diffusion vs MDLM semi-AR vs AR", flush=True)
    long = long_samples(models, tasks, args) if args.long_length else None
    exp_rows = {t: [expected_calls(mtask.schedule, t, args.length, name) for name in SAMPLERS]
                for t in sorted(set(args.cache_steps) | set(args.steps))}
    return {"checkpoints": ckpts, "cache_vs_ddpm": cache, "speed_vs_ar": speed,
            "expected_calls_by_batch": {"batches": list(SAMPLERS), "rows": exp_rows},
            "data_entropy": data_entropy(data_dir, "test", args.length,
                                         mtask.source_dictionary.eos()),
            "crossover": crossovers(speed), "long_samples": long,
            "notes": [n.format(L=args.length, L1=args.length + 1) for n in NOTES]}


def main(argv=None):
    args = parse_args(argv)
    out_dir = reporting.in_repo(args.output_dir)
    if args.report_only:
        return write_outputs(reporting.read_json(os.path.join(out_dir, "results.json")), out_dir)
    data_dir = measure.binarized_data(args.data, reporting.REPO)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    h = header(args, data_dir, argv)
    print(f"command: {h['command']}\nsetup: {h['setup']}", flush=True)
    res = {"header": h, "settings": vars(args), **measure_all(args, data_dir)}
    h["load_average_at_end"] = reporting.load_average()
    h["total_wall_s"] = time.perf_counter() - t_start
    reporting.write_text(os.path.join(out_dir, "results.json"),
                         json.dumps(res, indent=2, default=str))
    write_outputs(res, out_dir)
    print(markdown_report(res).split("![sampling speed]")[0])
    print(f"\ntotal {h['total_wall_s']:.0f} s; wrote {out_dir}/results.json, results.md, "
          f"sampling_speed.png")


if __name__ == "__main__":
    main()
