#!/usr/bin/env python
"""MDLM vs autoregressive baselines and diffusion variants on one corpus, one command.

    python examples/compare/compare.py --corpus ptb --seeds 1 2 3
    python examples/compare/compare.py --corpus sotu           # + zero-shot on PTB test

Every row (``--models``, ``--block-sizes``: rows of ``mdlm_plugin.recipes.VARIANTS``) is
trained by fairseq-train on the same data, updates, batch, optimizer, schedule and window,
once per seed, then evaluated on its last checkpoint: test perplexity (the bound and its SE
for diffusion rows; AR rows both by fairseq-eval-lm and with only </s> before each block),
zero-shot (--zero-shot), samples from every sampler at every step budget scored by the AR
models, and training throughput. Cells are means over seeds with the sd over seeds.
Outputs in --out: results.md, results.json, valid_ppl.png, gen_ppl.png; runs in --work-dir
are reused when finished and resumed when interrupted. See examples/compare/README.md.
"""
import argparse
import datetime
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)     # this checkout's mdlm_plugin, installed or not
from mdlm_plugin import recipes, reporting  # noqa: E402
from mdlm_plugin.diffusion.samplers import SAMPLERS  # noqa: E402
from mdlm_plugin.reporting import md_table  # noqa: E402

MODELS = ("mdlm", "mdlm_ar", "transformer_lm")     # the default rows
# published numbers, for scale (Sahoo et al. 2024, Table 1: LM1B test perplexity, 110M
# parameters; MDLM is a bound)
PAPER = [("LM1B, 33B tokens", 27.04, 22.32), ("LM1B, 327B tokens", 23.00, 20.86)]


class CompareError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"compare: error: {msg}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", choices=("ptb", "sotu"), default="ptb")
    p.add_argument("--data", help="binarized data (default data-bin/<corpus>, prepared if missing)")
    p.add_argument("--zero-shot", metavar="DIR", help="a test split with the same dict.txt, "
                   "scored zero-shot (default for sotu: <data>/ptb-test)")
    p.add_argument("--work-dir", help="runs (default checkpoints/compare_<corpus>)")
    p.add_argument("--out", help="results (default examples/compare/results/<corpus>)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated rows: "
                   + ", ".join(recipes.VARIANTS) + ", bd3_N (block diffusion)")
    p.add_argument("--block-sizes", type=int, nargs="*", default=[], help="adds a row bd3_N each")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="training seeds")
    p.add_argument("--seeds-for", nargs="*", default=[], metavar="MODEL=N",
                   help="train MODEL with the first N of --seeds only (marked in the tables)")
    add_training_flags(p)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-passes", type=int, default=4, help="Monte-Carlo passes of a bound")
    e.add_argument("--samples", type=int, default=16, help="per model, sampler and budget")
    e.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256, 1000])
    e.add_argument("--samplers", nargs="+", default=["ddpm_cache"], choices=SAMPLERS)
    e.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--reuse", nargs="*", default=[], metavar="RESULTS_JSON",
                   help="earlier comparisons' results.json: a run recorded there with the "
                   "same recipe is taken as it is (training, evaluation, samples), so seeds "
                   "and rows add up across sessions and machines; the AR judges (first "
                   "seeds) are always trained or reused from --work-dir, and evaluated")
    p.add_argument("--report-only", action="store_true", help="re-render from results.json")
    return p


def add_training_flags(p: argparse.ArgumentParser, max_update: int = 600,
                       validate_every: int = 100, threads: int = 0) -> None:
    """The recipe every row shares (also long_runs.py's)."""
    g = p.add_argument_group("training (the same for every model)")
    for flag, kind, default in (("--max-update", int, max_update), ("--batch-size", int, 32),
                                ("--tokens-per-sample", int, 128), ("--layers", int, 4),
                                ("--embed-dim", int, 256), ("--heads", int, 4),
                                ("--cond-dim", int, 128), ("--dropout", float, 0.1),
                                ("--lr", float, 1e-3), ("--warmup-updates", int, 100),
                                ("--validate-interval-updates", int, validate_every),
                                ("--threads", int, threads)):
        g.add_argument(flag, type=kind, default=default)
    g.add_argument("--extra-train-args", default="", help="more fairseq-train flags, e.g. '--fp16'")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.models += [f"bd3_{n}" for n in args.block_sizes if f"bd3_{n}" not in args.models]
    try:
        for m in args.models or p.error("--models is empty"):
            recipes.variant(m)
        args.seeds_for = {m: int(n) for m, n in (kv.split("=") for kv in args.seeds_for)}
    except ValueError as err:
        p.error(f"--models / --seeds-for: {err}")
    if any(m not in args.models or not 1 <= n <= len(args.seeds)
           for m, n in args.seeds_for.items()):
        p.error(f"--seeds-for: MODEL=N with MODEL in --models, 1 <= N <= {len(args.seeds)}")
    if len(set(args.seeds)) < len(args.seeds) or min(args.seeds) < 1:
        p.error("--seeds must be distinct positive integers")
    for name in ("max_update", "batch_size", "tokens_per_sample", "samples",
                 "validate_interval_updates", "sample_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.steps) <= 0 or args.eval_passes < 2:
        p.error("--steps must be positive and --eval-passes >= 2 (for a standard error)")
    args.data = args.data or os.path.join("data-bin", args.corpus)
    if args.zero_shot is None and args.corpus == "sotu":
        args.zero_shot = os.path.join(args.data, "ptb-test")
    args.work_dir = args.work_dir or os.path.join("checkpoints", f"compare_{args.corpus}")
    args.out = args.out or os.path.join(REPO, "examples", "compare", "results", args.corpus)
    return args


def seeds_of(model: str, args) -> List[int]:
    return args.seeds[:args.seeds_for.get(model, len(args.seeds))]


def evaluator(model: str) -> str:
    return recipes.family(recipes.variant(model).family).evaluator


# --------------------------------------------------------------------------- helpers

def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(cmd: List[str], log: str, args, what: str,
        env: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Run a fairseq CLI with its output in ``log`` (``env``: more environment
    variables); wall and CPU seconds used."""
    print(f"  $ {shlex.join(cmd)}\n    (log: {log})", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
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
        raise CompareError(f"{args.data} or {args.zero_shot} is not prepared: prepare it first")
    print(f"preparing {args.corpus}: $ {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise CompareError(f"data preparation failed: {shlex.join(cmd)}")


def word_tokens(data_dir: str) -> Optional[int]:
    """Words + lines of a split, when its prepare.json says (PTB's usual token count)."""
    path = os.path.join(data_dir, "prepare.json")
    if os.path.isfile(path):
        with open(path) as f:
            meta = json.load(f)
        if meta.get("words") and meta.get("lines"):
            return meta["words"] + meta["lines"]
    return None


# --------------------------------------------------------------------------- training

def run_dir(model: str, seed: int, args) -> str:
    """Seed 1 keeps the run directory runs had before seeds existed."""
    return os.path.join(args.work_dir, model if seed == 1 else f"{model}_seed{seed}")


def train_command(model: str, args, save_dir: str, seed: int = 1) -> List[str]:
    """The recipe of every row: the same window, batch, optimizer, schedule; its seed."""
    v, w = recipes.variant(model), args.validate_interval_updates
    size = recipes.Size(args.layers, args.embed_dim, args.heads, cond_dim=args.cond_dim,
                        max_positions=max(512, args.tokens_per_sample))
    # long runs (examples/compare/long_runs.py) keep every keep_every-th checkpoint, stop
    # early after `patience` validations without a new best, and validate diffusion rows
    # with several Monte-Carlo passes; at their defaults (0, 0, 1) nothing changes here
    keep, patience = getattr(args, "keep_every", 0), getattr(args, "patience", 0)
    log_every = getattr(args, "log_interval", 0) or max(1, min(25, args.max_update // 4))
    protocol = recipes.data_flags(args.tokens_per_sample, args.batch_size) + [
        "--required-batch-size-multiple", 1,
        *recipes.adam_inverse_sqrt(args.lr, min(args.warmup_updates, args.max_update)),
        "--max-update", args.max_update, "--validate-interval-updates", w,
        "--save-interval-updates", w, "--keep-interval-updates", 1, "--no-epoch-checkpoints",
        *(["--keep-interval-updates-pattern", keep] if keep else []),
        # long runs validate and save by updates only: fairseq's default also validates
        # (and saves) at every epoch's end, which would double the validations and make
        # --patience count a mix of both
        *(["--validate-interval", 10 ** 6, "--save-interval", 10 ** 6] if keep else []),
        *(["--patience", patience] if patience else []),
        "--save-dir", save_dir, "--log-format", "json",
        "--log-interval", log_every, "--seed", seed, "--num-workers", 0]
    passes = getattr(args, "valid_passes", 1)
    return recipes.train_command(
        v.family, args.data, protocol, size=size, dropout=args.dropout, device=device(),
        model_extra=["--eval-passes", passes] if evaluator(model) == "validate" else [],
        after_size=v.flags, overrides=shlex.split(args.extra_train_args))


def recipe(cmd: List[str]) -> List[str]:
    """A training command without where it logs, saves and finds the plugin: runs that
    differ only there trained the same model. Paths compare in their recorded (portable)
    form: ``fairseq-train`` for the executable, data relative to the repository."""
    where = {"--log-format", "--save-dir", "--user-dir"}
    return [reporting.portable(str(t)) for i, t in enumerate(cmd)
            if t not in where and not (i and cmd[i - 1] in where)]


def reusable(model: str, seed: int, args) -> Optional[Dict]:
    """This run as an earlier comparison (--reuse) recorded it, with its sample scores
    (``rows``), when its recipe is the same: neither trained nor evaluated again. An AR
    judge of the samples (a first seed) is not taken: its checkpoint is needed."""
    save_dir = run_dir(model, seed, args)
    want = recipe(train_command(model, args, save_dir, seed))
    for path in args.reuse:
        old = read_results(path)
        for run in old["runs"].get(model, []):
            if run["training"]["seed"] != seed or recipe(run["training"]["command"]) != want:
                continue
            if evaluator(model) == "eval_lm" and seed == seeds_of(model, args)[0]:
                return {"judge_recorded": {"path": path, "ppl": run["test"]["ppl"]}}
            rows = [({**r, "by_seed": []}, x) for r in old["generation"]["rows"]
                    if r["source"] == model for x in r["by_seed"] if x["seed"] == seed]
            print(f"{model} seed {seed}: taken from {path}", flush=True)
            return {**run, "reused_from": path, "rows": rows}
    return {}


def take_or_train(model: str, seed: int, args) -> Dict:
    run = reusable(model, seed, args)
    return run if "reused_from" in run else {**run, "training": train(model, seed, args)}


def seeded_training(done: Dict, seed: int) -> Dict:
    """A training record with its seed and wall minutes (single-seed records lack both)."""
    wall = None if done["resumed"] or done.get("wall_s") is None else done["wall_s"] / 60
    return {"wall_min": wall, **done, "seed": seed}


def read_train_log(text: str) -> Dict[str, object]:
    """The validation curve (updates, ppl) and the median words/s of the log intervals."""
    curve = {}
    for r in map(recipes.numbers, recipes.json_records(text, "valid")):
        if "valid_num_updates" in r and "valid_ppl" in r:
            curve[int(r["valid_num_updates"])] = r["valid_ppl"]
    wps = sorted(r["wps"] for r in map(recipes.numbers, recipes.json_records(text, "train_inner"))
                 if "wps" in r)
    return {"valid_curve": sorted(curve.items()), "train_wps_median": wps[len(wps) // 2]
            if wps else None}


def updates_done(checkpoint: str) -> int:
    import torch
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int((state.get("optimizer_history") or [{}])[-1].get("num_updates") or 0)


def train(model: str, seed: int, args) -> Dict[str, object]:
    save_dir = run_dir(model, seed, args)
    os.makedirs(save_dir, exist_ok=True)
    done_file = os.path.join(save_dir, "train_done.json")
    cmd = train_command(model, args, save_dir, seed)
    if os.path.isfile(done_file):
        with open(done_file) as f:
            done = json.load(f)
        if recipe(done.get("command") or []) == recipe(cmd):
            print(f"{model} seed {seed}: trained already ({done_file})", flush=True)
            return seeded_training(done, seed)
    print(f"{model} seed {seed}: training {args.max_update} updates", flush=True)
    log = os.path.join(save_dir, "train.log")
    resumed = os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt"))
    if resumed and updates_done(os.path.join(save_dir, "checkpoint_last.pt")) >= args.max_update:
        print(f"{model} seed {seed}: finished already, made without compare.py (its command "
              "is not checked; resuming would train one update more)", flush=True)
        timing = {"wall_s": None, "cpu_s": None}
    else:
        timing = run(cmd, log, args, f"training {model} seed {seed}")
    with open(log) as f:
        parsed = read_train_log(f.read())
    tokens = args.max_update * args.batch_size * args.tokens_per_sample
    result = {"model": model, "seed": seed, "command": cmd, "tokens_seen": tokens,
              "checkpoint": os.path.join(save_dir, "checkpoint_last.pt"), **parsed,
              "resumed": resumed, **timing,
              "tokens_per_cpu_s": None if resumed else tokens / max(timing["cpu_s"], 1e-9),
              "wall_min": None if resumed else timing["wall_s"] / 60}
    if not os.path.isfile(result["checkpoint"]):
        raise CompareError(f"training {model} wrote no {result['checkpoint']}; see {log}")
    with open(done_file, "w") as f:
        json.dump(result, f, indent=1)
    return result


# --------------------------------------------------------------------------- evaluation

def evaluate(model: str, ckpt: str, data_dir: str, args, tag: str) -> Dict[str, object]:
    """Test perplexity of ``ckpt`` on ``data_dir``'s test split: the bound and its SE
    (fairseq-validate) or the exact AR value (fairseq-eval-lm); exact token counts."""
    log = os.path.join(os.path.dirname(ckpt), f"eval_{tag}.log")
    if os.path.exists(log):
        os.remove(log)
    cmd = recipes.eval_command(recipes.variant(model).family, data_dir, ckpt,
                               batch_size=args.batch_size, eval_passes=args.eval_passes,
                               tokens_per_sample=args.tokens_per_sample, device=device())
    run(cmd, log, args, f"evaluation of {model} on {data_dir}")
    with open(log) as f:
        text = f.read()
    if evaluator(model) == "validate":
        records = recipes.json_records(text, "test")
        if not records:
            raise CompareError(f"no test result in {log}")
        r = recipes.numbers(records[-1])
        out = {"ppl": r["test_ppl"], "ppl_se": r.get("test_ppl_se"), "bits": r["test_loss"],
               "bound": True, "tokens": int(r["test_scored_tokens"])}
    else:
        r = recipes.eval_lm_result(text)
        if r is None:
            raise CompareError(f"no result in {log}")
        out = {"ppl": r["ppl"], "ppl_se": None, "bits": r["bits"], "bound": False,
               "tokens": r["tokens"]}
    words = word_tokens(data_dir)
    if words:      # the same total NLL, spread over words
        out["word_ppl"] = 2 ** (out["bits"] * out["tokens"] / words)
    return {**out, "command": cmd}


def score(tokens, judges: Dict[str, object]) -> Dict[str, object]:
    """A sample set under every AR judge, its unigram entropy and repeated 4-grams."""
    import torch
    from mdlm_plugin.diffusion.samplers import repeated_ngram_share, unigram_entropy
    from mdlm_plugin.generative_eval import generative_perplexity
    with torch.no_grad():
        by = {j: generative_perplexity(m, tokens) for j, m in judges.items()}
    return {"gen_ppl": {j: g["ppl"] for j, g in by.items()},
            "gen_ppl_se": {j: g["ppl_se"] for j, g in by.items()},
            "entropy": unigram_entropy(tokens), "repetition": repeated_ngram_share(tokens)}


def sample_sets(model: str, seed: int, loaded: tuple, dictionary, args):
    """(sampler, steps, tokens, seconds, network calls per sample) of one run: every
    sampler at every budget for a diffusion row, ancestral sampling for an AR row."""
    from mdlm_plugin.generative_eval import ar_samples, mdlm_samples
    net, task, _ = loaded
    L, n = args.tokens_per_sample, args.samples
    if evaluator(model) == "eval_lm":
        start = time.perf_counter()
        tokens = ar_samples(net, n, L, dictionary.eos(), seed, args.sample_batch,
                            forbid=(dictionary.pad(), dictionary.bos()))
        yield "ancestral", L, tokens, time.perf_counter() - start, L
    elif recipes.variant(model).sampled:
        for sampler in args.samplers:
            for steps in args.steps:
                start = time.perf_counter()
                tokens, st = mdlm_samples(task, net, n, L, steps, sampler, seed,
                                          args.sample_batch)
                yield sampler, steps, tokens, time.perf_counter() - start, st["row_calls"] / n


def evaluate_run(model: str, tr: Dict, judges: Dict, refs: Dict, args) -> Dict[str, object]:
    """Everything measured on one trained run; samples go into ``refs["rows"]``."""
    from mdlm_plugin.generative_eval import ar_block_perplexity, load_checkpoint
    ckpt, seed = tr["checkpoint"], tr["seed"]
    out = {"test": evaluate(model, ckpt, args.data, args, "test")}
    if args.zero_shot:
        out["zero_shot"] = evaluate(model, ckpt, args.zero_shot, args, "zero_shot")
    loaded = load_checkpoint(ckpt, args.data, {"tokens_per_sample": args.tokens_per_sample})
    out["params"] = loaded[2]["params"]
    if evaluator(model) == "eval_lm":      # only </s> before each block, as MDLM sees it
        out["test_eos_only"] = ar_block_perplexity(
            loaded[0], refs["stream"], args.tokens_per_sample, refs["dictionary"].eos())
    for sampler, steps, tokens, seconds, calls in (
            sample_sets(model, seed, loaded, refs["dictionary"], args) if judges else ()):
        print(f"  {model} seed {seed} {sampler} {steps}: {seconds:.1f} s", flush=True)
        row = refs["rows"].setdefault(f"{model} {sampler} {steps}", {
            "source": model, "sampler": sampler, "steps": steps, "by_seed": [],
            "example": refs["dictionary"].string(tokens[0])})
        row["by_seed"].append({"seed": seed, "seconds_per_sample": seconds / len(tokens),
                               "calls_per_sample": calls, **score(tokens, judges)})
    return out


def evaluate_all(res: Dict, args) -> None:
    """Test perplexities, zero-shot, samples of every run, into ``res["runs"]``; the AR
    judges of the samples are the AR rows' first seeds."""
    import torch
    from mdlm_plugin.generative_eval import data_blocks, load_checkpoint, split_stream
    if args.threads:
        torch.set_num_threads(args.threads)
    ars = [m for m in args.models if evaluator(m) == "eval_lm"]
    load = {"tokens_per_sample": args.tokens_per_sample}
    judges = {a: load_checkpoint(res["runs"][a][0]["training"]["checkpoint"], args.data, load)
              for a in ars}
    refs = {"stream": split_stream(args.data, "test"), "rows": {}, "dictionary": next(
        iter(judges.values()))[1].source_dictionary if judges else None}
    judges = {a: j[0] for a, j in judges.items()}
    if judges:
        blocks = data_blocks(args.data, "test", args.tokens_per_sample, args.samples)
        refs["rows"]["test data"] = {"source": "test data", "sampler": None, "steps": None,
                                     "by_seed": [score(blocks, judges)], "example": None}
    for m in args.models:
        for r in res["runs"][m]:
            for row, entry in r.pop("rows", ()):           # taken from --reuse
                refs["rows"].setdefault(f"{m} {row['sampler']} {row['steps']}",
                                        row)["by_seed"].append(entry)
            if "reused_from" not in r:
                print(f"evaluating {m} seed {r['training']['seed']}", flush=True)
                r.update(evaluate_run(m, r["training"], judges, refs, args))
    res["test_split_tokens"] = int(refs["stream"].numel())
    res["generation"] = {"rows": list(refs["rows"].values()), "judges": list(judges)}


# --------------------------------------------------------------------------- report

def mean_sd(values: List[float], spec: str = ".1f") -> str:
    """``mean ± sd`` over seeds (``(1 seed)`` where there is only one)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = format(statistics.fmean(values), spec)
    return f"{m} ± {statistics.stdev(values):{spec}}" if len(values) > 1 else f"{m} (1 seed)"


def per_seed(res: Dict, model: str, get) -> Dict[int, float]:
    return {r["training"]["seed"]: get(r) for r in res["runs"].get(model, [])}


def ratio_cell(res: Dict, a: str, get_a, b: str, get_b) -> str:
    """a / b paired by seed (the seeds both have), mean ± sd over the pairs."""
    xa, xb = per_seed(res, a, get_a), per_seed(res, b, get_b)
    return mean_sd([xa[s] / xb[s] for s in xa if s in xb and xa[s] and xb[s]], ".3f")


def test_ppl(r: Dict) -> float:
    """The row's test perplexity on an equal footing: a bound, or AR with </s> only
    (fairseq-eval-lm's where that was not measured)."""
    return (r.get("test_eos_only") or r["test"])["ppl"]


def eos_only_ppl(r: Dict) -> Optional[float]:
    return (r.get("test_eos_only") or {}).get("ppl")


def seeds_cell(res: Dict, m: str, args) -> str:
    n = len(res["runs"][m])
    return str(n) + (" *" if n < len(args.seeds) else "")


def header_section(res: Dict, args) -> List[str]:
    t = res["runs"][res["models"][0]][0]["training"]
    return [f"# MDLM vs autoregressive baselines: {args.corpus}", "",
            f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
            f"Date: {res['date']}, git {res['git']}", "",
            f"Each model: {args.max_update} updates of {args.batch_size} x "
            f"{args.tokens_per_sample} tokens ({t['tokens_seen']:,} tokens), "
            f"{args.layers} layers x {args.embed_dim} wide, {args.heads} heads, dropout "
            f"{args.dropout}, Adam lr {args.lr}, inverse-sqrt warm-up {args.warmup_updates}; "
            "evaluated on the last checkpoint. Seeds: " + " ".join(map(str, args.seeds))
            + " (`*`: fewer seeds). Cells: mean ± sd over seeds; ratios are paired by seed.",
            ""] + reused_line(res)


def notes(res: Dict, section: str) -> List[str]:
    """What a record says about its own measures in ``section`` (:func:`from_single_seed`)."""
    note = res.get("notes", {}).get(section)
    return [note, ""] if note else []


def reused_line(res: Dict) -> List[str]:
    reused = [f"{m} seed {r['training']['seed']}" for m in res["models"] for r in res["runs"][m]
              if "reused_from" in r]
    judges = [f"{m} seed {r['training']['seed']} {r['test']['ppl']:.2f} (recorded "
              f"{r['judge_recorded']['ppl']:.2f})" for m in res["models"] for r in res["runs"][m]
              if "judge_recorded" in r]
    return [f"Taken from earlier comparisons (`--reuse`, same recipe; `reused_from` in "
            f"results.json): {', '.join(reused)}. The AR judges, trained here again, "
            f"score the test set: {', '.join(judges) or '-'}.", ""] if reused else []


def test_section(res: Dict, args) -> List[str]:
    ars = [m for m in res["models"] if evaluator(m) == "eval_lm"]
    eos_only = all(eos_only_ppl(r) for m in ars for r in res["runs"][m])
    out = ["## Test perplexity", "",
           "Diffusion rows: upper bound (fairseq-validate, "
           f"{args.eval_passes} passes; SE: the evaluation's, mean over seeds). AR rows: "
           + ("exact, each block read after </s> only (what an MDLM block sees)." if eos_only
              else "exact, by fairseq-eval-lm (each block after the previous block's last "
              "token; the </s>-only score was not measured)."), ""]
    rows = []
    for m in res["models"]:
        runs, bound = res["runs"][m], evaluator(m) == "validate"
        tokens = {(r.get("test_eos_only") or r["test"])["tokens"] for r in runs}
        rows.append([m, seeds_cell(res, m, args), f"{runs[0]['params'] / 1e6:.2f}M",
                     ("<= " if bound else "") + mean_sd([test_ppl(r) for r in runs], ".2f"),
                     mean_sd([r["test"]["ppl_se"] for r in runs], ".2f") if bound else "exact",
                     ", ".join(f"{t:,}" for t in sorted(tokens)),
                     ratio_cell(res, m, test_ppl, "mdlm", test_ppl)])
    out += [md_table(["model", "seeds", "params", "test ppl", "eval SE", "tokens scored",
                      "/ mdlm"], rows), "",
            f"The test split has {res['test_split_tokens']:,} tokens.", ""]
    if ars:
        out += ["AR both ways: fairseq-eval-lm reads the previous block's last token before "
                "each block, the equal-footing scorer (`ar_block_perplexity`) only </s>.", ""]
        rows = [[m, mean_sd([r["test"]["ppl"] for r in res["runs"][m]], ".2f"),
                 mean_sd([eos_only_ppl(r) for r in res["runs"][m]], ".2f"),
                 ratio_cell(res, m, eos_only_ppl, m, lambda r: r["test"]["ppl"]),
                 f"{res['runs'][m][0]['test']['tokens']:,}",
                 ratio_cell(res, "mdlm", test_ppl, m, lambda r: r["test"]["ppl"]),
                 ratio_cell(res, "mdlm", test_ppl, m, eos_only_ppl)] for m in ars]
        out += [md_table(["model", "eval-lm ppl", "</s>-only ppl", "</s>-only / eval-lm",
                          "eval-lm tokens", "MDLM / eval-lm", "MDLM / </s>-only"], rows), ""]
    return out + against_mdlm(res) + [
        "For scale, the paper (Sahoo et al. 2024, LM1B, 110M parameters): " +
                  "; ".join(f"{name}: MDLM <= {a} vs AR {b} (ratio {a / b:.2f})"
                            for name, a, b in PAPER) + ".", ""]


def against_mdlm(res: Dict) -> List[str]:
    """Each diffusion row's mean bound minus MDLM's, resolved when it exceeds twice the
    larger sd over seeds of the two rows (a one-seed row has no sd to offer)."""
    others = [m for m in res["models"] if m != "mdlm" and evaluator(m) == "validate"]
    if "mdlm" not in res["models"] or not others:
        return []

    def stats(m):
        v = [test_ppl(r) for r in res["runs"][m]]
        return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None
    base, base_sd = stats("mdlm")
    rows = []
    for m in others:
        mean, sd = stats(m)
        spread = max((x for x in (sd, base_sd) if x is not None), default=None)
        diff = f"{mean - base:+.1f}"
        verdict = "no sd (one seed each)" if spread is None else \
            "yes" if abs(mean - base) > 2 * spread else "not resolved"
        rows.append([m, diff + (" (1 seed)" if spread is None else f" ± {spread:.1f}"),
                     verdict + (f" ({abs(mean - base) / spread:.1f} sd)" if spread else "")])
    return ["Against MDLM (mean bound minus MDLM's; ± the larger sd over seeds of the two "
            "rows): resolved when the difference exceeds 2 sd.", "",
            md_table(["model", "bound - mdlm", "beyond 2 sd"], rows), ""]


def zero_shot_section(res: Dict, args) -> List[str]:
    if not args.zero_shot:
        return []
    words = "word_ppl" in res["runs"][res["models"][0]][0]["zero_shot"]
    out = ["## Zero-shot", "", f"Trained on {args.corpus}, scored on `{args.zero_shot}` "
           "(test split, same dictionary; AR: fairseq-eval-lm)." + (
               " Word-level: exp(total NLL / (words + lines))." if words else ""), ""]
    rows = []
    for m in res["models"]:
        runs = [r["zero_shot"] for r in res["runs"][m]]
        bound = "<= " if runs[0]["bound"] else ""
        zs = lambda r: r["zero_shot"]["ppl"]  # noqa: E731
        rows.append([m, seeds_cell(res, m, args), bound + mean_sd([e["ppl"] for e in runs], ".2f")]
                    + ([bound + mean_sd([e["word_ppl"] for e in runs], ".2f")] if words else [])
                    + [f"{runs[0]['tokens']:,}", ratio_cell(res, m, zs, "mdlm", zs)])
    head = ["model", "seeds", "ppl per token"] + (["word-level ppl"] if words else []) \
        + ["tokens scored", "/ mdlm"]
    return out + [md_table(head, rows), ""]


def generation_section(res: Dict, args) -> List[str]:
    g = res["generation"]
    if not g["rows"]:
        return []
    out = ["## Samples", "",
           f"{args.samples} unconditional samples of {args.tokens_per_sample} tokens per row "
           "and seed, scored by each AR judge (its first seed): exp of the mean NLL of every "
           "token but the first, mean ± sd over seeds (SE over samples); entropy: unigram "
           "(nats); repeats: share of repeated 4-grams within a sample; calls: network calls "
           "per sample actually made. AR samples: ancestral. `test data`: the reference.", ""] \
        + notes(res, "samples")
    rows = []
    for r in g["rows"]:
        s = r["by_seed"]       # the test data row does not depend on a seed

        def cell(key, spec=".3f", judge=None):
            v = [x.get(key) if judge is None else x[key][judge] for x in s]
            return mean_sd(v, spec) if r["sampler"] else reporting.fmt(v[0], spec, "-")
        rows.append([r["source"], r["sampler"] or "-", r["steps"] or "-",
                     cell("calls_per_sample", ".0f")]
                    + [cell("gen_ppl", ".1f", j) + " (SE " + reporting.fmt(statistics.fmean(
                        x["gen_ppl_se"][j] for x in s), ".1f") + ")" for j in g["judges"]]
                    + [cell("entropy"), cell("repetition"), cell("seconds_per_sample", ".2f")])
    head = ["samples from", "sampler", "steps", "calls"] + \
        [f"gen ppl ({j})" for j in g["judges"]] + ["entropy", "repeats", "s / sample"]
    out += [md_table(head, rows), "", "First sample of each kind (first seed, most steps):", ""]
    most = (max(args.steps), args.tokens_per_sample)
    return out + [f"- {r['source']} {r['sampler']} {r['steps']}: `{r['example'][:300]}`"
                  for r in g["rows"] if r["example"] and r["steps"] in most] + [""]


def training_section(res: Dict, args) -> List[str]:
    out = ["## Training", "", "Tokens/s: fairseq's logged `wps` (median over log intervals); "
           "tokens per CPU-second: tokens seen / CPU time of fairseq-train (robust to other "
           "load) and wall time of the whole run, validation included: not for resumed runs.", ""]
    rows = []
    for m in res["models"]:
        t = [r["training"] for r in res["runs"][m]]
        rows.append([m, seeds_cell(res, m, args),
                     mean_sd([x["train_wps_median"] for x in t], ",.0f"),
                     mean_sd([x["tokens_per_cpu_s"] for x in t], ",.0f"),
                     mean_sd([x.get("wall_min") for x in t], ".1f"),
                     mean_sd([x["valid_curve"][-1][1] if x["valid_curve"] else None for x in t])])
    head = ["model", "seeds", "tokens/s", "tokens per CPU-s", "wall (min)", "final valid ppl"]
    return out + [md_table(head, rows), "", "Plots: `valid_ppl.png`, `gen_ppl.png`.", ""]


def report(res: Dict, args) -> str:
    return "\n".join(header_section(res, args) + test_section(res, args)
                     + zero_shot_section(res, args) + generation_section(res, args)
                     + training_section(res, args))


def plot_valid(res: Dict, path: str) -> None:
    """Validation perplexity (mean over seeds) against tokens seen, one line per row."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ys = []
    for m in res["models"]:
        curves = [dict(map(tuple, r["training"]["valid_curve"])) for r in res["runs"][m]]
        ups = sorted(set.intersection(*(set(c) for c in curves)))
        ys += [statistics.fmean(c[u] for c in curves) for u in ups]
        st = reporting.style(m)
        ax.plot([u * res["tokens_per_update"] / 1e6 for u in ups], ys[len(ys) - len(ups):],
                marker=st.marker, ms=5, color=st.colour,
                label=m + (" (bound)" if evaluator(m) == "validate" else ""))
    ax.set(xlabel="training tokens seen (millions)", ylabel="validation perplexity (per token)",
           title=f"{res['corpus'].upper()}: validation perplexity vs training tokens "
           "(mean over seeds)")
    reporting.scale(ax, "y", ys)
    if not ys:
        ax.text(0.5, 0.5, "no validation curve recorded\n(runs taken from an earlier comparison)",
                ha="center", va="center", transform=ax.transAxes)
    reporting.legend_outside(ax)
    reporting.save_figure(fig, path)


def plot_generation(res: Dict, path: str) -> None:
    """Generative perplexity against network calls per sample, one panel per AR judge,
    one line per (model, sampler): the model's colour and marker (the sampler's, for a
    model sampled several ways) and the sampler's line style; AR samples and test data as
    dotted horizontal references."""
    plt = reporting.pyplot()
    g = res["generation"]
    judges = g["judges"] or ["none"]
    dashes = {}
    fig, axes = plt.subplots(1, len(judges), figsize=(7 * len(judges), 4.5), squeeze=False)
    for ax, j in zip(axes[0], judges):
        lines: Dict[tuple, List] = {}
        ys = []
        for r in g["rows"]:
            y = statistics.fmean(x["gen_ppl"][j] for x in r["by_seed"])
            ys.append(y)
            if r["sampler"] in (None, "ancestral"):
                ax.axhline(y, color=reporting.style(r["source"]).colour, linestyle=":",
                           label=f"{r['source']} samples" if r["sampler"] else r["source"])
            else:
                calls = statistics.fmean(x["calls_per_sample"] for x in r["by_seed"])
                lines.setdefault((r["source"], r["sampler"]), []).append((calls, y))
        sources = [source for source, _ in lines]
        for (source, sampler), pts in lines.items():
            # a model sampled several ways: each sampler's own style tells them apart
            st = reporting.style(source if sources.count(source) == 1 else sampler)
            ls = dashes.setdefault(sampler, ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))[
                len(dashes) % 4])
            ax.plot(*zip(*sorted(pts)), marker=st.marker, color=st.colour, linestyle=ls,
                    label=f"{source}, {sampler}")
        ax.set(xlabel="network calls per sample", title=f"judged by {j}",
               ylabel=f"generative perplexity ({j})")
        reporting.scale(ax, "x", [x for pts in lines.values() for x, _ in pts])
        reporting.scale(ax, "y", ys)
        reporting.legend_outside(ax, fontsize=6)
    reporting.save_figure(fig, path, f"{res['corpus'].upper()}: generative perplexity of "
                          f"{res['args'].get('samples', '')} unconditional samples "
                          "vs network calls per sample")


def write_report(res: Dict, args) -> str:
    text = report(res, args)
    reporting.write_text(os.path.join(args.out, "results.md"), text + "\n")
    plot_valid(res, os.path.join(args.out, "valid_ppl.png"))
    plot_generation(res, os.path.join(args.out, "gen_ppl.png"))
    return text


# --------------------------------------------------------------------------- records

def read_results(path: str) -> Dict:
    """A comparison's results.json in the structure this script writes: a single-seed
    record (no ``runs``) is converted by :func:`from_single_seed`."""
    res = reporting.read_json(path)
    return res if "runs" in res else from_single_seed(res)


def from_single_seed(old: Dict) -> Dict:
    """A record with one training seed and no ``runs`` (``training``, ``test``, ``params``
    and ``zero_shot.by_model`` per model; generation rows ``scored_by`` each AR model) as
    runs of that seed. Its sample measures that differ from this script's are named in
    ``notes``; what it did not measure (AR test with </s> only, repeated 4-grams) stays
    out and renders as ``-``."""
    a, seed = old["args"], old["args"]["seed"]
    zero_shot = (old.get("zero_shot") or {}).get("by_model", {})
    runs = {m: [{"training": seeded_training(old["training"][m], seed), "test": old["test"][m],
                 "params": old["params"][m], **({"zero_shot": zero_shot[m]}
                                                if m in zero_shot else {})}]
            for m in old["models"]}
    g, batches = old["generation"], math.ceil(a["samples"] / a["sample_batch"])
    rows = []
    for r in g["rows"]:
        source, _, sampler = r["source"].partition(" (")   # "mdlm (ddpm_cache)"
        x = {"gen_ppl": {j: s["ppl"] for j, s in r["scored_by"].items()},
             "gen_ppl_se": {j: s["ppl_se"] for j, s in r["scored_by"].items()},
             "entropy": r["entropy"]}
        if source != "test data":
            x.update(seed=seed, seconds_per_sample=r["seconds"] / r["samples"],
                     calls_per_sample=r["network_calls"] / batches)
            sampler = sampler.rstrip(")") or "ancestral"
        rows.append({"source": source, "sampler": sampler or None, "steps": r["steps"],
                     "by_seed": [x], "example": g["examples"].get(f"{r['source']} {r['steps']}")})
    notes = {"samples": "In this record, generative perplexity scores every token, the first "
                        f"after </s>; calls: network calls per batch of {a['sample_batch']} "
                        "samples (each call runs the whole batch); repeats were not "
                        "measured (`-`)."}
    keep = ("corpus", "command", "machine", "date", "git", "models", "tokens_per_update",
            "test_split_tokens")
    return {**{k: old[k] for k in keep}, "runs": runs, "notes": notes,
            "args": {**a, "seeds": [seed], "seeds_for": {}, "samplers": [a["sampler"]]},
            "generation": {"rows": rows, "judges": g["scorers"]}}


# --------------------------------------------------------------------------- main

def report_only(args) -> None:
    path = os.path.join(args.out, "results.json")
    if not os.path.isfile(path):
        raise CompareError(f"{path} not found: run the comparison first")
    res = read_results(path)
    print(write_report(res, argparse.Namespace(**{**res["args"], "out": args.out})))


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    command = "python " + shlex.join([os.path.relpath(os.path.abspath(__file__))] +
                                     (sys.argv[1:] if argv is None else list(argv)))
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    prepare_data(args)
    runs = {m: [take_or_train(m, s, args) for s in seeds_of(m, args)] for m in args.models}
    res = {"corpus": args.corpus, "command": command,
           "machine": reporting.machine_line(reporting.machine(device(), args.threads or None)),
           "date": datetime.date.today().isoformat(), "git": reporting.git_revision(),
           "models": args.models, "runs": runs, "args": vars(args),
           "tokens_per_update": args.batch_size * args.tokens_per_sample}
    evaluate_all(res, args)
    reporting.write_text(os.path.join(args.out, "results.json"),
                         json.dumps(res, indent=1, default=str))
    print(write_report(res, args))
    print(f"written: {args.out}/results.md, results.json, valid_ppl.png, gen_ppl.png")


if __name__ == "__main__":
    main()
