#!/usr/bin/env python
"""Trained models, not first steps: each row trained to a token budget or its early stop,
with the test split scored at points along the way and at the best validation checkpoint.

    python examples/compare/long_runs.py --name ptb_long --data data-bin/ptb \\
        --rows mdlm@0.1 mdlm_ar@0.3 --max-update 4800 --jobs 2 --threads 1

A row is MODEL@DROPOUT (MODEL: a row of compare.py, e.g. mdlm, mdlm_ar, bd3_4), trained
with compare.py's recipe (same window, batch, optimizer, schedule) plus: every
``--eval-every`` updates a checkpoint is kept (``--keep-interval-updates-pattern``) and
scored on the test split; validation every ``--validate-interval-updates`` with
``--valid-passes`` Monte-Carlo passes at a fixed evaluation seed for diffusion rows (what
``checkpoint_best.pt`` and ``--patience`` select on); fairseq's ``--patience`` stops a
row early. Training runs in segments that end at each evaluation point, so every point is
recorded in ``results.json`` as soon as it exists; a later invocation never recomputes a
recorded point, an interrupted row resumes from ``checkpoint_last.pt``, and a larger
``--max-update`` extends a finished row from its checkpoint. Outputs in
examples/compare/results/<name>/: results.json, results.md, curves.png.
See examples/compare/README.md ("Long runs").
"""
import argparse
import datetime
import fcntl
import glob
import json
import math
import os
import re
import shlex
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402
from compare import CompareError, evaluator  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="results go to examples/compare/results/NAME")
    p.add_argument("--data", default=os.path.join("data-bin", "ptb"), help="binarized data")
    p.add_argument("--work-dir", help="runs (default checkpoints/long_<name>)")
    p.add_argument("--out", help="results (default examples/compare/results/<name>)")
    p.add_argument("--rows", nargs="+", default=[], metavar="MODEL@DROPOUT[~ROW]",
                   help="rows to train and score, e.g. mdlm@0.1 mdlm_ar@0.3 bd3_4@0.1; "
                   "bd3_4@0.1~mdlm@0.1 fine-tunes from row mdlm@0.1's best checkpoint")
    p.add_argument("--finetune-mask-rate", type=float, nargs=2, default=[0.3, 0.8],
                   metavar=("LOW", "HIGH"), help="--train-mask-rate of fine-tuned rows")
    p.add_argument("--eval-every", type=int, default=600,
                   help="keep and score a checkpoint every N updates")
    p.add_argument("--patience", type=int, default=5,
                   help="stop a row after N validations without a new best (0: never)")
    p.add_argument("--valid-passes", type=int, default=2,
                   help="Monte-Carlo passes of a diffusion row's validation bound")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once")
    p.add_argument("--eval-passes", type=int, default=4, help="Monte-Carlo passes of a test bound")
    p.add_argument("--report-only", action="store_true", help="re-render from results.json")
    s = p.add_argument_group("samples from the trained rows (--sample-only)")
    s.add_argument("--sample-only", action="store_true",
                   help="train nothing: sample from each row's best validation checkpoint as "
                   "it is now, judged by the chosen AR row's best checkpoint")
    s.add_argument("--sample-sets", nargs="+", default=list(SAMPLE_SETS),
                   metavar="SAMPLER:STEPS[:FLAG=VALUE,...]",
                   help="diffusion rows' sample sets; FLAG: a task sampler flag by its field "
                   "name (remdm_loop, confidence_noise, ...) or top_p (--sampling-topp)")
    s.add_argument("--samples", type=int, default=64, help="samples per row and set")
    s.add_argument("--sample-batch", type=int, default=16)
    compare.add_training_flags(p, max_update=4800, validate_every=200, threads=1)
    return p


# the reference repositories' settings: T = 1000 ancestral (MDLM), the window's 128 steps,
# ReMDM-loop at p = 0.9 with T = 1024 (kuleshov-group/remdm scripts/remdm-loop.sh), and
# MaskGIT-style confidence decoding with its annealed choice noise
SAMPLE_SETS = ("ddpm_cache:1000", "ddpm_cache:128", "first_hitting:128",
               "remdm:1024:remdm_loop=true,top_p=0.9", "confidence:128:confidence_noise=1")


def parse_sample_set(text: str) -> Dict[str, object]:
    """``SAMPLER:STEPS[:FLAG=VALUE,...]`` -> {"label", "sampler", "steps", "options",
    "top_p"}; values are read as JSON (true, 0.9) or kept as strings."""
    from mdlm_plugin.diffusion.samplers import SAMPLERS
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SAMPLERS or not parts[1].isdigit() \
            or int(parts[1]) <= 0:
        raise ValueError(f"{text!r} is not SAMPLER:STEPS[:FLAG=VALUE,...] with SAMPLER one of "
                         f"{', '.join(SAMPLERS)} (e.g. remdm:1024:remdm_loop=true,top_p=0.9)")
    options: Dict[str, object] = {}
    for kv in filter(None, (parts[2] if len(parts) == 3 else "").split(",")):
        key, eq, value = kv.partition("=")
        if not eq:
            raise ValueError(f"{text!r}: {kv!r} is not FLAG=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    top_p = float(options.pop("top_p", 1.0))
    if not 0 < top_p <= 1:
        raise ValueError(f"{text!r}: top_p must be in (0, 1]")
    return {"label": text, "sampler": parts[0], "steps": int(parts[1]), "options": options,
            "top_p": top_p}


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.rows = [parse_row(r) for r in args.rows]
    except ValueError as err:
        p.error(f"--rows: {err}")
    if not (args.rows or args.report_only):
        p.error("--rows is empty")
    try:
        args.sample_sets = [parse_sample_set(t) for t in args.sample_sets]
    except ValueError as err:
        p.error(f"--sample-sets: {err}")
    if args.samples <= 0 or args.sample_batch <= 0:
        p.error("--samples and --sample-batch must be positive")
    if args.eval_every <= 0 or args.validate_interval_updates <= 0 or \
            args.eval_every % args.validate_interval_updates:
        p.error("--eval-every must be a positive multiple of --validate-interval-updates")
    if args.max_update % args.validate_interval_updates or args.max_update < args.warmup_updates:
        p.error("--max-update must be a multiple of --validate-interval-updates and "
                ">= --warmup-updates")
    if args.valid_passes < 1 or args.eval_passes < 2 or args.jobs < 1 or args.patience < 0:
        p.error("--valid-passes >= 1, --eval-passes >= 2, --jobs >= 1, --patience >= 0")
    args.work_dir = args.work_dir or os.path.join("checkpoints", f"long_{args.name}")
    args.out = args.out or os.path.join(HERE, "results", args.name)
    args.keep_every = args.eval_every
    return args


def parse_row(text: str) -> Dict[str, object]:
    """``MODEL@DROPOUT`` -> {"name", "model", "dropout", "source": None};
    ``MODEL@DROPOUT~ROW``: the same, fine-tuned from ROW's best checkpoint (``source``)."""
    own, _, source = text.partition("~")
    m = re.fullmatch(r"(\w+)@([0-9.]+)", own)
    if not m:
        raise ValueError(f"{text!r} is not MODEL@DROPOUT[~MODEL@DROPOUT] (e.g. mdlm@0.1)")
    recipes.variant(m.group(1))
    dropout = float(m.group(2))
    if not 0 <= dropout < 1:
        raise ValueError(f"{text!r}: dropout must be in [0, 1)")
    row = {"name": f"{m.group(1)}@{dropout:g}", "model": m.group(1), "dropout": dropout,
           "source": parse_row(source)["name"] if source else None}
    if source and (evaluator(m.group(1)) != "validate" or "~" in source):
        raise ValueError(f"{text!r}: only diffusion rows are fine-tuned (with "
                         "--train-mask-rate), from a row trained from scratch")
    if source:
        row["name"] += "~" + row["source"]
    return row


# --------------------------------------------------------------------------- training

def row_dir(row: Dict, args) -> str:
    return os.path.join(args.work_dir, row["name"].replace("@", "_d").replace("~", "_from_"))


def source_checkpoint(row: Dict, args) -> str:
    return os.path.join(row_dir(parse_row(row["source"]), args), "checkpoint_best.pt")


def segment_command(row: Dict, args, until: int) -> List[str]:
    """fairseq-train for this row, stopping at update ``until`` (a later segment resumes
    from its checkpoint_last.pt; fairseq applies --finetune-from-model only to the first)."""
    extra = shlex.split(args.extra_train_args)
    if row["source"]:
        extra += ["--finetune-from-model", source_checkpoint(row, args), "--train-mask-rate",
                  *map(str, args.finetune_mask_rate)]
    a = argparse.Namespace(**{**vars(args), "dropout": row["dropout"], "max_update": until,
                              "extra_train_args": shlex.join(extra)})
    return compare.train_command(row["model"], a, row_dir(row, args), args.seed)


def identity(cmd: List[str]) -> List[str]:
    """What makes two segments (or two invocations) the same run: the command without
    where it logs, saves and finds the plugin, and without the budget; the checkpoint a
    row is fine-tuned from by its row directory's name."""
    out = compare.recipe(cmd)
    i = out.index("--max-update")
    out = out[:i] + out[i + 2:]
    if "--finetune-from-model" in out:
        j = out.index("--finetune-from-model") + 1
        out[j] = os.path.basename(os.path.dirname(out[j])) + "/checkpoint_best.pt"
    return out


def relative(path: str) -> str:
    """A path as committed results record it: relative to the repository when inside it."""
    rel = os.path.relpath(os.path.abspath(path), compare.REPO)
    return path if rel.startswith("..") else rel


def recorded_identity(row: Dict, args) -> List[str]:
    """``identity`` as results.json stores it: no machine paths (the executable by its
    name, the data relative to the repository)."""
    cmd = identity(segment_command(row, args, args.max_update))
    return [os.path.basename(cmd[0]), relative(cmd[1])] + cmd[2:]


def trained_to(row: Dict, args) -> int:
    last = os.path.join(row_dir(row, args), "checkpoint_last.pt")
    return compare.updates_done(last) if os.path.isfile(last) else 0


def train_segment(row: Dict, args, until: int) -> Dict[str, object]:
    """Train (or resume) the row up to update ``until``; whether fairseq stopped it early
    (``--patience``), and the CPU/wall seconds of the segment."""
    log = os.path.join(row_dir(row, args), "train.log")
    os.makedirs(row_dir(row, args), exist_ok=True)
    start = os.path.getsize(log) if os.path.isfile(log) else 0
    print(f"{row['name']}: training to update {until}", flush=True)
    timing = compare.run(segment_command(row, args, until), log, args,
                         f"training {row['name']} to update {until}")
    with open(log) as f:
        f.seek(start)
        early = "early stop since valid performance" in f.read()
    return {**timing, "stopped_early": early}


def kept_checkpoint(row: Dict, args, update: int) -> Optional[str]:
    """The checkpoint fairseq kept at ``update`` (checkpoint_<epoch>_<update>.pt)."""
    found = glob.glob(os.path.join(row_dir(row, args), f"checkpoint_*_{update}.pt"))
    return found[0] if found else None


# --------------------------------------------------------------------------- evaluation

_LOAD_LOCK = threading.Lock()


def score(row: Dict, ckpt: str, args, tag: str) -> Dict[str, object]:
    """Test perplexity of one checkpoint: the bound and its SE for diffusion rows; for AR
    rows fairseq-eval-lm and each block after </s> only (what an MDLM block sees)."""
    out = compare.evaluate(row["model"], ckpt, args.data, args, tag)
    out.pop("command")
    if evaluator(row["model"]) == "eval_lm":
        from mdlm_plugin.generative_eval import (ar_block_perplexity, load_checkpoint,
                                                 split_stream)
        with _LOAD_LOCK:          # fairseq's task/model registries are not thread-safe
            net, task, _ = load_checkpoint(ckpt, args.data,
                                           {"tokens_per_sample": args.tokens_per_sample})
        eos = ar_block_perplexity(net, split_stream(args.data, "test"),
                                  args.tokens_per_sample, task.source_dictionary.eos())
        out["eval_lm_ppl"], out["ppl"] = out["ppl"], eos["ppl"]
        out["tokens"], out["bits"] = eos["tokens"], math.log2(eos["ppl"])
    return out


def valid_curve(row: Dict, args) -> List[List[float]]:
    log = os.path.join(row_dir(row, args), "train.log")
    if not os.path.isfile(log):
        return []
    with open(log) as f:
        return [list(p) for p in compare.read_train_log(f.read())["valid_curve"]]


def point_record(row: Dict, args, update: int, ckpt: str, train_tokens: int) -> Dict:
    tokens = update * args.batch_size * args.tokens_per_sample
    valid = dict(map(tuple, valid_curve(row, args))).get(update)
    return {"update": update, "tokens": tokens, "epochs": tokens / train_tokens,
            "valid_ppl": valid, "test": score(row, ckpt, args, f"test_{update}"),
            "date": datetime.date.today().isoformat(), "git": reporting.git_revision()}


# --------------------------------------------------------------------------- records

class Records:
    """results.json, one entry per row, rewritten whole (tmp + rename) under a file lock
    each time a point finishes: concurrent rows and concurrent invocations see every
    recorded point, and a kill never leaves half a file."""

    def __init__(self, args, header: Dict):
        self.path = os.path.join(args.out, "results.json")
        self.header, self.lock = header, threading.Lock()

    def read(self) -> Dict:
        if not os.path.isfile(self.path):
            return {"rows": {}}
        return reporting.read_json(self.path)

    def update_header(self, key: str, value) -> None:
        """A top-level entry besides the rows (the sampling protocol)."""
        self.header[key] = value
        self.update(None, lambda _: None)

    def update(self, name: Optional[str], change) -> Dict:
        with self.lock, open(self.path + ".lock", "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            old = self.read()
            res = {**old, **self.header}
            # every distinct invocation that wrote here (rows trained, samples drawn)
            res["commands"] = list(old.get("commands") or (
                [old["command"]] if "command" in old else []))
            if self.header["command"] not in res["commands"]:
                res["commands"].append(self.header["command"])
            rec = res["rows"].setdefault(name, {}) if name is not None else {}
            change(rec)
            with open(self.path + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(self.path + ".tmp", self.path)
            return rec


def start_record(row: Dict, args, records: Records) -> Dict:
    """The row's record, checked against this invocation's recipe."""
    want = recorded_identity(row, args)

    def init(rec):
        if rec.get("identity") not in (None, want):
            raise CompareError(
                f"{row['name']} is recorded in {records.path} with another recipe; "
                f"use another --name or --work-dir. Recorded: {shlex.join(rec['identity'])}")
        rec.update(model=row["model"], dropout=row["dropout"], identity=want,
                   bound=evaluator(row["model"]) == "validate", budget=args.max_update)
        rec.setdefault("points", {})
        rec.setdefault("train", {"cpu_s": 0.0, "wall_s": 0.0, "segments": 0})
    return records.update(row["name"], init)


def run_row(row: Dict, args, records: Records, train_tokens: int) -> None:
    """Train the row in segments that end at each evaluation point, scoring every kept
    checkpoint not yet recorded, until the budget or an early stop; then the best one."""
    if row["source"] and not (records.read()["rows"].get(row["source"]) or {}).get("best"):
        raise CompareError(f"{row['name']}: row {row['source']} has no best checkpoint "
                           "recorded yet: train it first (it may be in the same --rows)")
    rec = start_record(row, args, records)
    while True:
        done = trained_to(row, args)
        for u in range(args.eval_every, done + 1, args.eval_every):
            if str(u) not in rec["points"] and kept_checkpoint(row, args, u):
                rec = record_point(row, args, records, u, kept_checkpoint(row, args, u),
                                   train_tokens)
        if rec.get("stopped_early_at") is not None or done >= args.max_update:
            break
        seg = train_segment(row, args, min(done // args.eval_every * args.eval_every
                                           + args.eval_every, args.max_update))

        def add(r, seg=seg, now=trained_to(row, args)):
            t = r["train"]
            r["train"] = {"cpu_s": t["cpu_s"] + seg["cpu_s"],
                          "wall_s": t["wall_s"] + seg["wall_s"], "segments": t["segments"] + 1}
            r.update(trained_to=now, valid_curve=valid_curve(row, args))
            if seg["stopped_early"]:
                r["stopped_early_at"] = now
        rec = records.update(row["name"], add)
    finish_row(row, args, records, train_tokens)


def record_point(row, args, records, update, ckpt, train_tokens) -> Dict:
    print(f"{row['name']}: scoring the test split at update {update}", flush=True)
    point = point_record(row, args, update, ckpt, train_tokens)
    return records.update(row["name"], lambda r: r["points"].__setitem__(str(update), point))


def finish_row(row: Dict, args, records: Records, train_tokens: int) -> None:
    """The last checkpoint and the best validation checkpoint, scored once each."""
    last = os.path.join(row_dir(row, args), "checkpoint_last.pt")
    best = os.path.join(row_dir(row, args), "checkpoint_best.pt")
    rec = records.read()["rows"][row["name"]]
    done = compare.updates_done(last)
    if str(done) not in rec["points"]:
        rec = record_point(row, args, records, done, last, train_tokens)
    u = compare.updates_done(best)
    if (rec.get("best") or {}).get("update") != u:
        point = rec["points"].get(str(u)) or point_record(row, args, u, best, train_tokens)
        records.update(row["name"], lambda r: r.update(best=point))


# --------------------------------------------------------------------------- samples

def best_checkpoint(row: Dict, args) -> str:
    path = os.path.join(row_dir(row, args), "checkpoint_best.pt")
    if not os.path.isfile(path):
        raise CompareError(f"{row['name']} has no {path}: train the row first")
    return path


def sample_sets_of(model: str, args) -> List[Dict[str, object]]:
    """What is drawn from a row: ancestral samples of an AR row, the sample sets of a
    diffusion row (block models through their block sampler), nothing for the ablations
    compare.py does not sample either."""
    if evaluator(model) == "eval_lm":
        return [{"label": f"ancestral:{args.tokens_per_sample}", "sampler": None}]
    return list(args.sample_sets) if recipes.variant(model).sampled else []


def draw(sset: Dict, loaded: tuple, args):
    """(tokens, network calls per sample) of one sample set."""
    from mdlm_plugin.generative_eval import ar_samples, mdlm_samples
    net, task, _ = loaded
    d, L, n = task.source_dictionary, args.tokens_per_sample, args.samples
    if sset["sampler"] is None:
        return ar_samples(net, n, L, d.eos(), args.seed, args.sample_batch,
                          forbid=(d.pad(), d.bos())), float(L)
    tokens, st = mdlm_samples(task, net, n, L, sset["steps"], sset["sampler"], args.seed,
                              args.sample_batch, options=sset["options"], top_p=sset["top_p"])
    return tokens, st["row_calls"] / n


def sample_rows(args, records: Records) -> None:
    """Every listed row's sample sets from its best validation checkpoint as it is now,
    scored under the chosen AR row's best checkpoint (generative perplexity, unigram
    entropy, repeated 4-grams, network calls and seconds per sample, the load average
    while it ran). A set recorded for the same checkpoints, judge and sizes is kept."""
    import time
    from mdlm_plugin.generative_eval import data_blocks, load_checkpoint
    pick = chosen(records.read()["rows"]).get("mdlm_ar")
    if pick is None:
        raise CompareError("no mdlm_ar row has a validation curve in "
                           f"{records.path}: train one first (it judges the samples)")
    load = {"tokens_per_sample": args.tokens_per_sample}
    judge = load_checkpoint(best_checkpoint(parse_row(pick), args), args.data, load)
    key = {"judge": pick, "judge_update": judge[2]["num_updates"], "samples": args.samples,
           "length": args.tokens_per_sample, "seed": args.seed}
    judges = {pick: judge[0]}
    test = compare.score(data_blocks(args.data, "test", args.tokens_per_sample, args.samples),
                         judges)
    records.update_header("sampling", {**key, "test_data": test})
    for row in args.rows:
        sets = sample_sets_of(row["model"], args)
        if not sets:
            continue
        loaded = load_checkpoint(best_checkpoint(row, args), args.data, load)
        rec = records.read()["rows"].get(row["name"]) or {}
        now = {**key, "update": loaded[2]["num_updates"], "finished": bool(
            rec.get("stopped_early_at") is not None or rec.get("best"))}
        old = rec.get("samples") or {}
        if any(old.get(k) != v for k, v in now.items()):
            records.update(row["name"], lambda r, now=now: r.update(samples={**now, "sets": {}}))
            old = {"sets": {}}
        for sset in sets:
            if sset["label"] in old["sets"]:
                continue
            print(f"{row['name']} (update {now['update']}): sampling {sset['label']}",
                  flush=True)
            load_avg, start = os.getloadavg()[0], time.perf_counter()
            tokens, calls = draw(sset, loaded, args)
            entry = {"seconds_per_sample": (time.perf_counter() - start) / len(tokens),
                     "calls_per_sample": calls, "load_average": load_avg,
                     "date": datetime.date.today().isoformat(), "git": reporting.git_revision(),
                     "example": loaded[1].source_dictionary.string(tokens[0]),
                     **compare.score(tokens, judges)}
            records.update(row["name"], lambda r, lb=sset["label"], e=entry:
                           r["samples"]["sets"].__setitem__(lb, e))


# --------------------------------------------------------------------------- report

def status(rec: Dict) -> str:
    if rec.get("stopped_early_at") is not None:
        return f"early stop at {rec['stopped_early_at']:,}"
    done = rec.get("trained_to") or 0
    return "budget reached" if done >= rec["budget"] else f"cut at {done:,} of {rec['budget']:,}"


def best_valid(rec: Dict) -> Optional[float]:
    return min((v for _, v in rec.get("valid_curve") or []), default=None)


def chosen(rows: Dict[str, Dict]) -> Dict[str, str]:
    """Per model, the row (dropout) with the lowest validation perplexity so far."""
    out: Dict[str, str] = {}
    for name, rec in rows.items():
        if best_valid(rec) is not None and (rec["model"] not in out or best_valid(rec) <
                                            best_valid(rows[out[rec["model"]]])):
            out[rec["model"]] = name
    return out


def ppl_cell(test: Dict, bound: bool) -> str:
    se = f" ± {test['ppl_se']:.2f}" if test.get("ppl_se") else ""
    return ("<= " if bound else "") + f"{test['ppl']:.2f}" + se


def main_table(res: Dict) -> List[str]:
    rows, pick = res["rows"], chosen(res["rows"])
    ar = rows.get(pick.get("mdlm_ar", ""), {}).get("best")
    out = []
    for name, rec in rows.items():
        b, done = rec.get("best"), rec.get("trained_to") or 0
        tokens = done * res["tokens_per_update"]
        out.append([name, "yes" if pick.get(rec["model"]) == name else "",
                    f"{done:,} / {tokens / 1e6:.1f}M / {tokens / res['train_tokens']:.1f}",
                    status(rec),
                    f"{b['update']:,}: {b['valid_ppl']:.2f}" if b else "-",
                    ppl_cell(b["test"], rec["bound"]) if b else "-",
                    f"{b['test']['ppl'] / ar['test']['ppl']:.3f}" if b and ar else "-"])
    return [reporting.md_table(
        ["row (model@dropout)", "chosen", "updates / tokens / epochs", "status",
         "best valid (update: ppl)", "test ppl at best (± eval SE)", "/ chosen AR"], out), ""]


def targets(res: Dict) -> List[str]:
    """The issue's targets, measured on the chosen rows' best checkpoints."""
    pick, rows, lines = chosen(res["rows"]), res["rows"], []
    pick = {m: n for m, n in pick.items() if rows[n].get("best")}
    if "mdlm_ar" not in pick:
        return lines
    ar = rows[pick["mdlm_ar"]]["best"]["test"]["ppl"]
    for model, goal in (("mdlm", 1.5), ("bd3_4", 1.25)):
        if model in pick:
            r = rows[pick[model]]["best"]["test"]["ppl"] / ar
            lines.append(f"- {model} / mdlm_ar = {r:.3f} (target <= {goal}): "
                         + ("met" if r <= goal else "missed"))
    if "mdlm" in pick:
        m = rows[pick["mdlm"]]["best"]["test"]["ppl"]
        lines.append(f"- MDLM's best bound {'below' if m < ar else 'not below'} AR's best "
                     f"perplexity ({m:.2f} vs {ar:.2f})")
    return ["Targets, on each model's chosen row at its best validation checkpoint:", ""] \
        + lines + [""] if lines else []


def turn_up(curve: List[List[float]], train_tokens: int, tokens_per_update: int) -> str:
    """The epoch of the lowest validation perplexity, when later ones are higher."""
    if len(curve) < 2:
        return "-"
    u, _ = min(curve, key=lambda p: p[1])
    later = u < curve[-1][0]
    return f"{u * tokens_per_update / train_tokens:.1f}" + ("" if later else " (still falling)")


def points_table(res: Dict) -> List[str]:
    ups = sorted({int(u) for r in res["rows"].values() for u in r["points"]})
    rows = [[name] + [ppl_cell(rec["points"][str(u)]["test"], rec["bound"])
                      if str(u) in rec["points"] else "" for u in ups]
            + [turn_up(rec.get("valid_curve") or [], res["train_tokens"],
                       res["tokens_per_update"])] for name, rec in res["rows"].items()]
    head = ["row"] + [f"{u * res['tokens_per_update'] / 1e6:.1f}M" for u in ups] + \
        ["best-valid epoch"]
    return ["Test perplexity (bound for diffusion rows) at each evaluation point, by "
            "tokens seen; the last column is the epoch of the lowest validation perplexity "
            "(`still falling` when it is the last one):", "", reporting.md_table(head, rows), ""]


def report(res: Dict) -> str:
    a = res["args"]
    commands = res.get("commands") or [res["command"]]
    head = [f"# Trained models: {res['name']}", "",
            *(f"Command: `{c}`  " for c in commands),
            f"Machine: {res['machine']}  ",
            f"Date: {res['date']}, git {res['git']} (the last invocation; points and sample "
            "sets record their own date and commit in results.json)", "",
            f"Data: `{a['data']}` ({res['train_tokens']:,} training tokens). Every row: "
            f"{a['layers']} layers x {a['embed_dim']}, {a['heads']} heads, batches of "
            f"{a['batch_size']} x {a['tokens_per_sample']} tokens, Adam lr {a['lr']}, "
            f"inverse-sqrt warm-up {a['warmup_updates']}, weight decay 0.01; validation every "
            f"{a['validate_interval_updates']} updates ({a['valid_passes']} Monte-Carlo passes "
            f"at a fixed seed for bounds), early stop after {a['patience']} validations "
            f"without a new best; test split scored every {a['eval_every']} updates and at "
            f"the best validation checkpoint ({a['eval_passes']} passes for bounds; AR rows: "
            "each block after </s> only, MDLM's context). Tokens seen = updates x "
            f"{res['tokens_per_update']}. `chosen`: the row of its model with the lowest best "
            "validation perplexity (the dropout choice). One training seed per row: the "
            "± is the evaluation's Monte-Carlo SE, not a seed spread.", ""]
    return "\n".join(head + main_table(res) + targets(res) + points_table(res)
                     + ["Plot: `curves.png`.", ""] + samples_section(res))


def samples_section(res: Dict) -> List[str]:
    """The sample sets of every row, scored by one judge, beside the test data's blocks."""
    sp = res.get("sampling")
    rows = [(name, rec["samples"]) for name, rec in res["rows"].items()
            if (rec.get("samples") or {}).get("sets")]
    if not sp or not rows:
        return []
    j = sp["judge"]
    ar = next((s for name, rec in rows if name == j for s in rec["sets"].values()), None)
    table = [["test data", "-", "-", f"{sp['test_data']['gen_ppl'][j]:.1f}",
              f"{sp['test_data']['entropy']:.3f}", f"{sp['test_data']['repetition']:.3f}",
              "-", "-", "-"]]
    for name, smp in rows:
        for label, e in smp["sets"].items():
            table.append([f"{name} (update {smp['update']:,}"
                          + ("" if smp["finished"] else ", training") + ")", label,
                          f"{e['calls_per_sample']:.0f}",
                          f"{e['gen_ppl'][j]:.1f} ± {e['gen_ppl_se'][j]:.1f}",
                          f"{e['entropy']:.3f}", f"{e['repetition']:.3f}",
                          f"{e['gen_ppl'][j] / ar['gen_ppl'][j]:.2f}" if ar else "-",
                          f"{e['entropy'] / ar['entropy']:.3f}" if ar else "-",
                          f"{e['seconds_per_sample']:.2f} ({e['load_average']:.1f})"])
    out = [f"## Samples from the best validation checkpoints", "",
           f"{sp['samples']} samples of {sp['length']} tokens per row and set (seed "
           f"{sp['seed']}), judged by `{j}`'s best checkpoint (update {sp['judge_update']:,}): "
           "generative perplexity (the first token is context) ± its SE over samples, unigram "
           "entropy (nats) and the share of repeated 4-grams per sample, averaged; "
           "`test data`: the first blocks of the test split. Seconds per sample on one "
           "thread, with the 1-minute load average of the machine when the set ran (above "
           "1: other work shared the cores, so the time is an upper bound). `training`: the "
           "row was still training, its best checkpoint may change.", "",
           reporting.md_table(["row (checkpoint)", "sample set", "calls / sample",
                               f"gen ppl ({j})", "entropy", "rep. 4-grams",
                               "/ AR gen ppl", "/ AR entropy", "s / sample (load)"], table), ""]
    pick = chosen(res["rows"]).get("mdlm")
    if ar and pick and pick in dict(rows):
        out += ["Target (within 3x the AR samples' generative perplexity, entropy within 5%), "
                f"`{pick}`:", ""]
        for label, e in dict(rows)[pick]["sets"].items():
            g, h = e["gen_ppl"][j] / ar["gen_ppl"][j], e["entropy"] / ar["entropy"]
            ok = g <= 3 and abs(h - 1) <= 0.05
            out.append(f"- {label}: {g:.2f}x, entropy {h:.3f}x: {'met' if ok else 'missed'}")
        out.append("")
    return out + ["Plot: `samples.png`.", ""]


def plot(res: Dict, path: str) -> None:
    """Test perplexity against tokens seen; each diffusion row over the chosen AR row at
    the same points; validation perplexity against epochs."""
    plt = reporting.pyplot()
    rows, per = res["rows"], res["tokens_per_update"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ar = rows.get(chosen(rows).get("mdlm_ar", ""), {}).get("points", {})
    ys: List[List[float]] = [[], [], []]
    ar_best = rows.get(chosen(rows).get("mdlm_ar", ""), {}).get("best")
    for name, rec in rows.items():
        st = reporting.style(name)
        # rows of one model differ by marker and by line style (dropout 0.1 -, 0.3 --, ...)
        dash = ("-", "--", ":", "-.")[round(10 * rec["dropout"]) // 2 % 4]
        kw = {"color": st.colour, "marker": st.marker, "label": name, "linestyle": dash}
        pts = sorted((int(u), p["test"]["ppl"]) for u, p in rec["points"].items())
        ratio = [(u * per / 1e6, y / ar[str(u)]["test"]["ppl"]) for u, y in pts
                 if rec["bound"] and str(u) in ar]
        if rec["bound"] and ar_best:     # against the AR row's best checkpoint, every point
            best = [(u * per / 1e6, y / ar_best["test"]["ppl"]) for u, y in pts]
            axes[1].plot(*zip(*best), markersize=6, color=st.colour, marker=st.marker,
                         linestyle=":", alpha=0.6, label=f"{name} / AR best checkpoint")
            ys[1] += [v for _, v in best]
        curve = [(u * per / res["train_tokens"], y) for u, y in rec.get("valid_curve") or []]
        for ax, line, y in zip(axes, ([(u * per / 1e6, y) for u, y in pts], ratio, curve), ys):
            if line:
                ax.plot(*zip(*line), markersize=6, **{**kw, "label": f"{name} / AR at the "
                                                      "same tokens" if ax is axes[1] else name})
                y += [v for _, v in line]
    axes[1].axhline(1.0, color="grey", linestyle=":")
    for ax, y, (xlabel, ylabel, title) in zip(axes, ys, (
            ("tokens seen (millions)", "test perplexity (diffusion: bound)", "test split"),
            ("tokens seen (millions)", "test perplexity / chosen AR row's",
             "diffusion rows over the chosen AR row"),
            ("epochs", "validation perplexity (diffusion: bound)", "validation split"))):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        reporting.scale(ax, "y", y)
    axes[1].legend(loc="upper right", fontsize=7)
    reporting.legend_outside(axes[2])
    reporting.save_figure(fig, path, f"{res['name']}: {res['args']['data']}, "
                          "one training seed per row")


def render(res: Dict, out: str) -> str:
    text = report(res)
    reporting.write_text(os.path.join(out, "results.md"), text + "\n")
    plot(res, os.path.join(out, "curves.png"))
    if res.get("sampling"):
        plot_samples(res, os.path.join(out, "samples.png"))
    return text


SET_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")


def plot_samples(res: Dict, path: str) -> None:
    """Generative perplexity and entropy of every sample set against network calls."""
    plt = reporting.pyplot()
    sp, j = res["sampling"], res["sampling"]["judge"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ys: List[List[float]] = [[], []]
    labels = sorted({lb for rec in res["rows"].values()
                     for lb in ((rec.get("samples") or {}).get("sets") or {})})
    calls = []
    for name, rec in res["rows"].items():
        sets = (rec.get("samples") or {}).get("sets") or {}
        for label, e in sets.items():      # a row's colour, a sample set's marker
            marker = SET_MARKERS[labels.index(label) % len(SET_MARKERS)]
            for ax, y, v in zip(axes, ys, (e["gen_ppl"][j], e["entropy"])):
                ax.plot([e["calls_per_sample"]], [v], linestyle="none", markersize=7,
                        color=reporting.style(name).colour, marker=marker,
                        label=f"{name} {label}")
                y.append(v)
            calls.append(e["calls_per_sample"])
    for ax, y, v, what in zip(axes, ys, (sp["test_data"]["gen_ppl"][j],
                                         sp["test_data"]["entropy"]),
                              (f"generative perplexity ({j} judge)", "unigram entropy (nats)")):
        ax.axhline(v, color="grey", linestyle=":", label="test data")
        ax.set(xlabel="network calls per sample", ylabel=what,
               title=what.split(" (")[0] + f" of {sp['length']}-token samples")
        reporting.scale(ax, "x", calls)
        reporting.scale(ax, "y", y + [v])
    reporting.legend_outside(axes[1])
    reporting.save_figure(fig, path, f"{res['name']}: samples from the best checkpoints")


# --------------------------------------------------------------------------- main

def header(args, argv) -> Dict[str, object]:
    """What every write of results.json carries: the invocation (without --work-dir, a
    path of the machine), machine, date, commit, the shared recipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--work-dir" in argv:
        i = argv.index("--work-dir")
        argv = argv[:i] + argv[i + 2:]
    from mdlm_plugin.generative_eval import split_stream
    keep = ("data", "max_update", "batch_size", "tokens_per_sample", "layers", "embed_dim",
            "heads", "cond_dim", "lr", "warmup_updates", "validate_interval_updates",
            "eval_every", "patience", "valid_passes", "eval_passes", "seed")
    return {"name": args.name, "command": "python " + shlex.join(
                [relative(os.path.abspath(__file__))] + argv),
            "machine": reporting.machine_line(reporting.machine(compare.device(), args.threads)),
            "date": datetime.date.today().isoformat(), "git": reporting.git_revision(),
            "args": {k: relative(v) if k == "data" else v for k, v in vars(args).items()
                     if k in keep},
            "tokens_per_update": args.batch_size * args.tokens_per_sample,
            "train_tokens": int(split_stream(args.data, "train").numel())}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    if args.report_only:
        if not os.path.isfile(path):
            raise CompareError(f"{path} not found: run the rows first")
        return print(render(reporting.read_json(path), args.out))
    if not os.path.isfile(os.path.join(args.data, "dict.txt")):
        raise CompareError(f"{args.data} is not a binarized data directory (no dict.txt): "
                           "prepare it first, e.g. examples/ptb/prepare.sh")
    import torch
    torch.set_num_threads(args.threads or 1)
    records = Records(args, header(args, argv))
    train_tokens = records.header["train_tokens"]
    if args.sample_only:
        sample_rows(args, records)
        print(render(records.read(), args.out))
        return print(f"written: {relative(args.out)}/results.md, results.json, curves.png, "
                     "samples.png")
    for phase in (False, True):            # fine-tuned rows after the rows they start from
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(run_row, r, args, records, train_tokens)
                      for r in args.rows if bool(r["source"]) == phase]:
                f.result()
    print(render(records.read(), args.out))
    print(f"written: {relative(args.out)}/results.md, results.json, curves.png")


if __name__ == "__main__":
    main()
