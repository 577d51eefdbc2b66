#!/usr/bin/env python
"""Training throughput and peak memory: MDLM ``mdlm_tiny`` vs fairseq ``transformer_lm``
of the same size, each trained by ``fairseq-train`` (command lines from
``mdlm_plugin.recipes``), runs interleaved. What is measured and why: benchmarks/README.md.

    python benchmarks/train_throughput.py [DATA_DIR=data-bin/ptb] [--updates 60] [--repeats 2]
    python benchmarks/train_throughput.py --compile-blocks   # + mdlm_tiny compiled vs eager
    python benchmarks/train_throughput.py --report-only [--output-dir DIR]
"""
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import measure  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402
from mdlm_plugin.reporting import fmt, pct  # noqa: E402

MDLM = "mdlm_tiny"
BASELINE = "transformer_lm"
BD3 = "bd3_tiny"       # mdlm_tiny with --block-size (issue 10)
COMPILED = "mdlm_tiny_compiled"     # mdlm_tiny with --compile-blocks (issue 21)
MODELS = (MDLM, BASELINE)
# the runs a flag adds, each compared with MDLM (eager): its summary column and ratio
EXTRA = {BD3: ("bd3", "BD3 / MDLM"), COMPILED: ("compiled", "compiled / eager")}
MACHINE_KEYS = ("date", "cpu", "cpu_cores", "cpu_cores_usable", "torch_threads",
                "load_average", "device", "gpu", "python", "torch", "fairseq", "mdlm_plugin",
                "git")
# (label, Run attribute, format, headline); the memory rows depend on the device
METRICS = [("tokens/s (fairseq wps, median)", "wps_median", ",.1f", True),
           ("tokens/s (best interval)", "wps_best", ",.1f", False),
           ("tokens per CPU-second (measured intervals)", "train_tokens_per_cpu_s", ",.1f", False)]
CPU_MEMORY = [("peak RSS (MiB)", "peak_rss_mib", ",.0f", True),
              ("RSS increase during training (MiB)", "rss_train_increase_mib", ",.0f", False)]
GPU_MEMORY = [("peak torch allocated (GiB, from gb_free)", "gpu_peak_allocated_gib", ",.2f", True),
              ("peak nvidia-smi process memory (MiB)", "gpu_smi_peak_mib", ",.0f", False),
              ("peak host RSS (MiB)", "peak_rss_mib", ",.0f", False)]
PARAMS = [("parameters", "params", ",.0f", False)]
SPECS = {k: s for _, k, s, _ in METRICS + CPU_MEMORY + GPU_MEMORY + PARAMS}
# see benchmarks/README.md for what each changes
FLAGS = {"--updates": (int, 60, "training updates per run"),
         "--log-interval": (int, 10, "updates per train_inner record (one throughput sample)"),
         "--warmup-intervals": (int, 1, "leading train_inner intervals not measured"),
         "--repeats": (int, 2, "runs per model (interleaved)"),
         "--batch-size": (int, 32, "sequences per batch"),
         "--tokens-per-sample": (int, 128, "tokens per sequence"),
         "--lr": (float, 1e-3, "Adam learning rate (fixed)"),
         "--dropout": (float, 0.1, "dropout of both models"), "--seed": (int, 1, None),
         "--num-workers": (int, 0, "fairseq data workers (0: one process, exact peak RSS)"),
         "--block-size": (int, None, "also train BD3: mdlm_tiny with this --block-size"),
         "--threads": (int, None, "OMP/MKL_NUM_THREADS of the runs (default: torch's)"),
         "--output-dir": (str, "benchmarks/results", "results, plot and logs (repo-relative)"),
         "--run-timeout": (float, 3600.0, "seconds before a run is killed"),
         "--amp": (bool, False, "GPU only: --amp for both runs"),
         "--compile-blocks": (bool, False, "also train mdlm_tiny with --compile-blocks "
                              "(torch.compile, inductor), interleaved with the eager runs"),
         "--report-only": (bool, False, "only rewrite results.md and the plot from "
                           "--output-dir/results.json")}


def parse_args(argv=None):
    p = measure.parser(__doc__, FLAGS, ("data-bin/ptb", "fairseq-preprocess --only-source "
                                        "directory (repo-relative)"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    if args.updates < args.log_interval * (args.warmup_intervals + 1):
        p.error(f"--updates {args.updates} gives no measured interval: it must be at least "
                f"--log-interval x (--warmup-intervals + 1) = "
                f"{args.log_interval * (args.warmup_intervals + 1)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.amp and args.device == "cpu":
        p.error("--amp is for GPU runs")
    return args


def pick_device(choice: str) -> str:
    import torch
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    return choice if choice != "auto" else ("cuda" if has_cuda else "cpu")


def train_command(model: str, args, data_dir: str, device: str, save_dir: str) -> List[str]:
    protocol = recipes.data_flags(args.tokens_per_sample, args.batch_size) + [
        "--optimizer", "adam", "--lr", args.lr, "--lr-scheduler", "fixed",
        "--max-update", args.updates, "--seed", args.seed,
        "--log-format", "json", "--log-interval", args.log_interval,
        "--no-save", "--save-dir", save_dir, "--disable-validation",
        "--num-workers", args.num_workers]
    size = recipes.ARCH_SIZES["tiny"] if model == BASELINE else None   # sized to match
    extra = ["--block-size", args.block_size] if model == BD3 else []
    extra += ["--compile-blocks"] if model == COMPILED else []
    return recipes.train_command(BASELINE if model == BASELINE else "mdlm", data_dir, protocol,
                                 size=size, dropout=args.dropout, device=device, model_extra=extra,
                                 overrides=["--amp"] if device == "cuda" and args.amp else [])


# --------------------------------------------------------------------------- one run

@dataclass
class Run:
    model: str
    repeat: int
    command: List[str]
    log_file: str
    returncode: Optional[int] = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    params: Optional[int] = None
    intervals: List[Dict[str, float]] = field(default_factory=list)
    wps_measured: List[float] = field(default_factory=list)
    wps_median: Optional[float] = None
    wps_best: Optional[float] = None
    updates_done: int = 0
    tokens_per_cpu_s: Optional[float] = None        # whole process, start-up included
    train_tokens_per_cpu_s: Optional[float] = None  # measured intervals only
    other_load: Optional[float] = None              # share of all cores used by others
    snapshots: List[Dict[str, float]] = field(default_factory=list)
    peak_rss_mib: Optional[float] = None          # kernel peak RSS (wait4 rusage)
    rss_at_train_start_mib: Optional[float] = None
    rss_train_increase_mib: Optional[float] = None
    tree_rss_peak_mib: Optional[float] = None     # sampled sum over the process tree
    gpu_peak_allocated_gib: Optional[float] = None
    gpu_smi_peak_mib: Optional[float] = None
    load_before: List[float] = field(default_factory=list)
    load_after: List[float] = field(default_factory=list)
    config: Dict[str, object] = field(default_factory=dict)
    arch_check: Dict[str, object] = field(default_factory=dict)


def interval_stats(run: Run, warmup: int) -> None:
    """CPU-time throughput and other processes' load over the measured intervals:
    ``run.snapshots[0]`` is taken when training starts, then one per train_inner record,
    so interval k (0-based) lies between snapshots k and k + 1."""
    tokens = cpu = busy_others = total = 0.0
    for k in range(warmup, min(len(run.intervals), len(run.snapshots) - 1)):
        a, b, iv = run.snapshots[k], run.snapshots[k + 1], run.intervals[k]
        if a["cpu"] is None or b["cpu"] is None or "wpb" not in iv:
            continue
        d_cpu = b["cpu"] - a["cpu"]
        tokens += (b["num_updates"] - a["num_updates"]) * iv["wpb"]
        cpu += d_cpu
        busy_others += max(0.0, (b["machine_busy"] - a["machine_busy"]) - d_cpu)
        total += b["machine_total"] - a["machine_total"]
    run.train_tokens_per_cpu_s = tokens / cpu if cpu > 0 else None
    run.other_load = busy_others / total if total > 0 else None


def check_architecture(model: str, config: Dict[str, object], log_text: str, args) -> Dict:
    """Depth, width, heads, FFN and dropout as the child built them: depth and FFN off the
    printed module tree ("(0-3): 4 x Block(...)"), width off every embedding, heads and
    dropout off the logged config."""
    block, prefix = ("TransformerDecoderLayer", "decoder_") if model == BASELINE else \
        ("DiTBlock", "")
    embed_dims = sorted({int(d) for d in re.findall(r"Embedding\(\d+, (\d+)", log_text)})
    m = re.search(rf"\((\d+)-(\d+)\): (\d+) x {block}", log_text)
    layers = int(m.group(3)) if m else len(re.findall(rf"\(\d+\): {block}\w*\(", log_text))
    found = {"layers": layers, "width": config.get(f"{prefix}embed_dim"),
             "embedding_widths": embed_dims, "heads": config.get(f"{prefix}attention_heads"),
             "ffn_256x1024_present": "Linear(in_features=256, out_features=1024" in log_text,
             "dropout": config.get("dropout"),
             "width_projections": len(re.findall(r"project_(?:in|out)_dim\): Linear", log_text))}
    dropout = found["dropout"]
    checks = [(layers == 4, f"{layers} layers, expected 4"),
              (found["width"] == 256 and all(d == 256 for d in embed_dims),
               f"width {found['width']}, embeddings {embed_dims}, expected 256"),
              (found["heads"] == 4, f"{found['heads']} heads, expected 4"),
              (found["ffn_256x1024_present"], "no 256 -> 1024 FFN layer"),
              (not found["width_projections"],
               f"{found['width_projections']} input/output width projections"),
              (dropout is None or abs(float(dropout) - args.dropout) <= 1e-9,
               f"dropout {dropout}, expected {args.dropout}")]
    return {**found, "problems": [text for ok, text in checks if not ok]}


def read_line(run: Run, line: str, pid: int, gpu: Dict) -> None:
    """Take what one line of fairseq-train's log says into ``run`` (and ``gpu``)."""
    if "Start iterating over samples" in line:
        run.snapshots = [measure.snapshot(pid, 0)]
        run.rss_at_train_start_mib = measure.rss_mib(pid)
    for record in recipes.json_records(line, "train_inner"):
        values = recipes.numbers(record)
        run.intervals.append(values)
        if run.snapshots:
            run.snapshots.append(measure.snapshot(pid, values.get("num_updates", 0)))
        if "gb_free" in values:
            gpu["gb_free_min"] = min(gpu.get("gb_free_min", values["gb_free"]), values["gb_free"])
        print(f"    update {int(values.get('num_updates', 0)):>5}  "
              f"wps {values.get('wps', float('nan')):>9.1f}  "
              f"loss {values.get('loss', float('nan')):.3f}", flush=True)
    run.params = run.params or recipes.logged_params(line)
    gpu["total_gib"] = gpu.get("total_gib") or recipes.logged_gpu_memory_gib(line)
    if "fairseq_cli.train | {" in line and not run.config:
        run.config = recipes.logged_model_config(line)


def run_once(model: str, repeat: int, args, data_dir: str, device: str, log_dir: str,
             save_dir: str) -> Run:
    run = Run(model=model, repeat=repeat,
              command=train_command(model, args, data_dir, device, save_dir),
              log_file=os.path.join(log_dir, f"{model}_run{repeat}.log"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **measure.thread_env(args.threads))
    gpu = {}
    run.load_before = reporting.load_average()
    out = measure.run_logged(run.command, run.log_file, env, REPO, args.run_timeout,
                             lambda line, pid: read_line(run, line, pid, gpu), device == "cuda",
                             what=f"{model} run {repeat}")
    run.load_after = reporting.load_average()
    run.wall_s, run.returncode, run.cpu_s = out["wall_s"], out["returncode"], out["cpu_s"]
    run.tree_rss_peak_mib, run.gpu_smi_peak_mib = out["tree_rss_peak_mib"], out["smi_peak_mib"]
    run.peak_rss_mib = out["usage"].ru_maxrss / 1024            # Linux: KiB
    if run.rss_at_train_start_mib is not None:
        run.rss_train_increase_mib = run.peak_rss_mib - run.rss_at_train_start_mib
    if gpu.get("total_gib") and "gb_free_min" in gpu:
        run.gpu_peak_allocated_gib = gpu["total_gib"] - gpu["gb_free_min"]
    throughput(run, args)
    run.arch_check = check_architecture(model, run.config, "".join(out["lines"]), args)
    return run


def throughput(run: Run, args) -> None:
    run.updates_done = int(run.intervals[-1]["num_updates"]) if run.intervals else 0
    run.wps_measured = [iv["wps"] for iv in run.intervals[args.warmup_intervals:] if "wps" in iv]
    if not run.wps_measured:
        sys.exit(f"error: {run.model} run {run.repeat} logged {len(run.intervals)} train_inner "
                 f"intervals, none left after {args.warmup_intervals} warm-up one(s) "
                 f"(log: {run.log_file})")
    run.wps_median = statistics.median(run.wps_measured)
    run.wps_best = max(run.wps_measured)
    interval_stats(run, args.warmup_intervals)
    wpb = statistics.median(iv["wpb"] for iv in run.intervals if "wpb" in iv)
    run.tokens_per_cpu_s = wpb * run.updates_done / run.cpu_s if run.cpu_s else None


# --------------------------------------------------------------------------- report

def summarize(runs: List[Dict], device: str) -> List[Dict[str, object]]:
    def median_of(model, attr):
        values = [r[attr] for r in runs if r["model"] == model and r.get(attr) is not None]
        return statistics.median(values) if values else None
    rows = []
    for label, attr, _, headline in METRICS + (CPU_MEMORY if device == "cpu" else GPU_MEMORY) \
            + PARAMS:
        a, b = median_of(MDLM, attr), median_of(BASELINE, attr)
        rows.append({"metric": label, "key": attr, "mdlm": a, "transformer_lm": b,
                     "ratio": reporting.ratio(a, b), "headline": headline})
        for model, (key, _) in EXTRA.items():
            if any(r["model"] == model for r in runs):
                c = median_of(model, attr)
                rows[-1].update({key: c, f"{key}_over_mdlm": reporting.ratio(c, a)})
    return rows


def extras(res: Dict) -> List[str]:
    """The added runs (``EXTRA``) that a result holds, in the order of ``EXTRA``."""
    return [m for m, (key, _) in EXTRA.items() if key in res["summary"][0]]


def runs_tables(runs: List[Dict], device: str) -> List[str]:
    rows = [[i, r["model"], fmt(r["wps_median"]), fmt(r["wps_best"]),
             ", ".join(f"{w:,.0f}" for w in r["wps_measured"]),
             fmt(r["train_tokens_per_cpu_s"]), pct(r["other_load"]),
             fmt(r["peak_rss_mib"], ",.0f"), fmt(r["rss_train_increase_mib"], ",.0f"),
             f"{r['cpu_s']:,.1f}", f"{r['wall_s']:,.1f}"] for i, r in enumerate(runs, 1)]
    out = [reporting.md_table(
        ["#", "model", "tokens/s (median)", "best", "tokens/s per interval", "tokens/CPU-s",
         "other load", "peak RSS MiB", "RSS increase MiB", "CPU s", "wall s"], rows,
        align="rlrrlrrrrrr")]
    if device == "cuda":
        out += ["", reporting.md_table(
            ["#", "model", "peak torch allocated GiB", "nvidia-smi peak MiB"],
            [[i, r["model"], fmt(r["gpu_peak_allocated_gib"], ".2f"),
              fmt(r["gpu_smi_peak_mib"], ",.0f")] for i, r in enumerate(runs, 1)], align="rlrr")]
    return out


def check_table(runs: List[Dict]) -> str:
    first = {r["model"]: r for r in reversed(runs)}
    rows = [[m, fmt(first[m]["params"], ",.0f"), *(first[m]["arch_check"][k] for k in (
        "layers", "width", "embedding_widths", "heads", "ffn_256x1024_present", "dropout"))]
        for m in dict.fromkeys(r["model"] for r in runs)]
    return reporting.md_table(["model", "params", "layers", "width", "embedding widths", "heads",
                               "FFN 256->1024", "dropout"], rows, align="lrrrlrlr")


NOTES = ("Notes: throughput is fairseq's `wps` of the `train_inner` lines after the first "
         "{warmup_intervals} interval(s) of {log_interval} updates; both models count the "
         "same non-padding tokens per batch. Peak RSS is the kernel's high-water mark of the "
         "fairseq-train process (includes Python, torch and fairseq themselves); 'RSS "
         "increase' subtracts the RSS at the start of training. 'tokens per CPU-second' "
         "divides the tokens of the measured intervals by the fairseq-train process's "
         "user+system CPU time over them: less sensitive to other load on the machine than "
         "wall-clock tokens/s. 'other load' is the share of all cores' time that other "
         "processes used during the measured intervals: wall-clock numbers from runs with a "
         "high one are unreliable.")


COMPILE_NOTE = (" `mdlm_tiny_compiled` is `mdlm_tiny` with `--compile-blocks` (each DiT "
                "block through torch.compile, inductor), same data, seed and protocol: its "
                "first updates pay the compilation, which the warm-up interval(s) leave out; "
                "compiled / eager is its tokens/s over the eager MDLM's.")


def headline(res: Dict) -> List[str]:
    """One line per added run: its median tokens/s beside the eager MDLM's, and the ratio."""
    row = next(r for r in res["summary"] if r["key"] == "wps_median")
    return [f"{m}: {fmt(row[EXTRA[m][0]])} tokens/s vs {MDLM} {fmt(row['mdlm'])} tokens/s, "
            f"{EXTRA[m][1]} = {fmt(row[EXTRA[m][0] + '_over_mdlm'], '.3f')}"
            for m in extras(res)]


def markdown_report(res: Dict) -> str:
    h, s, runs = res["header"], res["settings"], res["runs"]
    added = extras(res)
    summary = [[row["metric"], fmt(row["mdlm"], SPECS[row["key"]]),
                fmt(row["transformer_lm"], SPECS[row["key"]]), fmt(row["ratio"], ".3f")]
               + [cell for m in added for cell in (
                   fmt(row[EXTRA[m][0]], SPECS[row["key"]]),
                   fmt(row[f"{EXTRA[m][0]}_over_mdlm"], ".3f"))]
               for row in res["summary"]]
    lines = ["# Training throughput: MDLM `mdlm_tiny` vs fairseq `transformer_lm`", "",
             "```", h["command"], "```", "", reporting.machine_table(h["machine"], MACHINE_KEYS),
             f"| data | `{h['data']}` |", f"| setup | {h['setup']} |", "",
             "## Summary (medians over runs; ratio = MDLM / transformer_lm)", "",
             reporting.md_table(["metric", "mdlm_tiny", "transformer_lm", "ratio"]
                                + [c for m in added for c in (m, EXTRA[m][1])], summary,
                                align="lrrr" + "rr" * len(added)),
             "", "## Runs (in execution order)", "",
             *runs_tables(runs, h["machine"]["device"]), "",
             "## Configuration check (as the runs built it)", "", check_table(runs), "",
             "## Commands", ""]
    for model in dict.fromkeys(r["model"] for r in runs):
        cmd = next(r["command"] for r in runs if r["model"] == model)
        lines += [f"{model}:", "```", shlex.join(cmd), "```", ""]
    notes = NOTES.format(**s) + (COMPILE_NOTE if COMPILED in added else "")
    return "\n".join(lines + [notes, ""])


def plot(res: Dict, path: str) -> None:
    h, s, runs = res["header"], res["settings"], res["runs"]
    device = h["machine"]["device"]
    panels = [("wps_median", "training tokens/s (median)"),
              ("peak_rss_mib", "peak RSS (MiB)") if device == "cpu"
              else ("gpu_peak_allocated_gib", "peak torch allocated (GiB)")]
    rows = {row["key"]: row for row in res["summary"]}
    models = list(dict.fromkeys(r["model"] for r in runs))
    column = {MDLM: "mdlm", BASELINE: "transformer_lm",
              **{m: key for m, (key, _) in EXTRA.items()}}
    fig, axes = reporting.pyplot().subplots(1, 2, figsize=(10, 4.2))
    for ax, (key, label) in zip(axes, panels):
        heights = [rows[key][column[m]] or 0.0 for m in models]
        values = [[r[key] for r in runs if r["model"] == m and r.get(key) is not None]
                  for m in models]
        for bar, hgt in zip(reporting.bars(ax, models, heights, values, label), heights):
            ax.annotate(f"{hgt:,.0f}" if hgt >= 10 else f"{hgt:.2f}",
                        (bar.get_x() + bar.get_width() / 2, hgt), ha="center", va="bottom",
                        fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, max([1e-9, *heights, *sum(values, [])]) * 1.18)
        ax.set_title(f"{label}\nMDLM / transformer_lm = {fmt(rows[key]['ratio'], '.3f')}",
                     fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    m = h["machine"]
    reporting.save_figure(fig, path, f"{m['cpu'] if device == 'cpu' else m['gpu']}, torch "
                          f"{m['torch']}, {s['batch_size']}x{s['tokens_per_sample']} tokens, "
                          f"{s['repeats']} runs/model")


def write_outputs(res: Dict, out_dir: str) -> None:
    reporting.write_text(os.path.join(out_dir, "results.md"), markdown_report(res))
    plot(res, os.path.join(out_dir, "throughput_memory.png"))


# --------------------------------------------------------------------------- main

def setup_line(args) -> str:
    return (f"{args.batch_size} x {args.tokens_per_sample} tokens/batch, {args.updates} "
            f"updates/run (log every {args.log_interval}, first {args.warmup_intervals} "
            f"interval(s) = warm-up), Adam lr {args.lr:g} fixed, dropout {args.dropout:g}, "
            f"{args.repeats} interleaved run(s)/model, seed {args.seed}"
            + (", --amp" if args.amp else "")
            + (f", {args.threads} thread(s)" if args.threads else ""))


def run_all(args, data_dir: str, device: str, log_dir: str) -> List[Run]:
    runs: List[Run] = []
    models = MODELS + ((BD3,) if args.block_size else ()) + \
        ((COMPILED,) if args.compile_blocks else ())
    with tempfile.TemporaryDirectory(prefix="mdlm-bench-") as save_dir:
        for repeat in range(1, args.repeats + 1):
            for model in models:
                print(f"[run {len(runs) + 1}/{len(models) * args.repeats}] {model} (repeat "
                      f"{repeat}) load {os.getloadavg()[0]:.2f}", flush=True)
                run = run_once(model, repeat, args, data_dir, device, log_dir, save_dir)
                if len(runs) < 2:
                    print("    $ " + shlex.join(run.command), flush=True)
                if run.arch_check["problems"]:
                    sys.exit(f"error: {model} was not built as specified: "
                             f"{'; '.join(run.arch_check['problems'])} (log: {run.log_file})")
                print(f"    -> {fmt(run.wps_median)} tokens/s, {fmt(run.train_tokens_per_cpu_s)}"
                      f" tokens/CPU-s, other load {pct(run.other_load)}, peak RSS "
                      f"{fmt(run.peak_rss_mib, ',.0f')} MiB, {run.wall_s:.1f} s", flush=True)
                runs.append(run)
    return runs


def main(argv=None):
    args = parse_args(argv)
    out_dir = reporting.in_repo(args.output_dir)
    if args.report_only:
        return write_outputs(reporting.read_json(os.path.join(out_dir, "results.json")), out_dir)
    data_dir = measure.binarized_data(args.data, reporting.REPO)
    device = pick_device(args.device)
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    gpu = ", ".join(measure.nvidia_smi("--query-gpu=name,memory.total")[:1]) or None
    machine = reporting.machine(device, args.threads, gpu if device == "cuda" else None)
    header = {"command": reporting.invocation(__file__, argv), "machine": machine,
              "data": data_dir, "setup": setup_line(args)}
    print(f"command: {header['command']}\nmachine: {reporting.machine_line(machine)}\n"
          f"setup: {header['setup']}", flush=True)
    runs = [asdict(r) for r in run_all(args, data_dir, device, log_dir)]
    res = {"header": header, "settings": vars(args), "summary": summarize(runs, device),
           "runs": runs}
    reporting.write_text(os.path.join(out_dir, "results.json"), json.dumps(res, indent=2))
    write_outputs(res, out_dir)
    print(markdown_report(res).split("## Runs")[0])
    print("\n".join(headline(res)))
    print(f"wrote {out_dir}/results.json, results.md, throughput_memory.png, logs/*.log")


if __name__ == "__main__":
    main()
