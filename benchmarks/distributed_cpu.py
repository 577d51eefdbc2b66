"""Training tokens/s on CPU: one fairseq-train process (all cores as threads, and 1
thread) vs N gloo ranks (``python -m mdlm_plugin.launch_cpu``), same model, same global
batch, runs interleaved. Setup and measures: benchmarks/README.md.

    python benchmarks/distributed_cpu.py [DATA_DIR=data-bin/ptb] [--updates 30] [--repeats 2]
    python benchmarks/distributed_cpu.py --report-only
"""
import json
import os
import re
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
import measure  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402

WORK = os.path.join(tempfile.gettempdir(), "mdlm_dist_bench")
FLAGS = {"--updates": (int, 30, None), "--log-interval": (int, 5, None),
         "--repeats": (int, 2, None), "--nprocs": (int, 2, None),
         "--batch-size": (int, 32, "global batch (sequences)"),
         "--tokens-per-sample": (int, 128, None), "--arch": (str, "mdlm_tiny", None),
         "--output": (str, os.path.join(REPO, "benchmarks", "results", "distributed_cpu"),
                      "writes OUTPUT.json and OUTPUT.md"),
         "--report-only": (bool, False, "only rewrite OUTPUT.md from OUTPUT.json")}


def parse_args(argv=None):
    return measure.parser(__doc__, FLAGS, (os.path.join(REPO, "data-bin", "ptb"), None)
                          ).parse_args(argv)


def train_command(args, batch, save_dir, exe, device):
    protocol = recipes.data_flags(args.tokens_per_sample, batch) + [
        "--optimizer", "adam", "--lr", "1e-3", "--max-update", args.updates, "--seed", "1",
        "--no-save", "--disable-validation", "--num-workers", "0", "--log-format", "json",
        "--log-interval", args.log_interval, "--save-dir", save_dir]
    return recipes.train_command("mdlm", args.data, protocol, exe=exe, arch=args.arch,
                                 device=device)


def commands(args, cores):
    """setup name -> (command, environment)."""
    if args.batch_size % args.nprocs:
        sys.exit(f"--batch-size {args.batch_size} is not divisible by --nprocs {args.nprocs}")
    one = train_command(args, args.batch_size, f"{WORK}/one",
                        [sys.executable, "-m", "fairseq_cli.train"], "cpu")
    per_rank = max(1, cores // args.nprocs)
    launcher = [sys.executable, "-m", "mdlm_plugin.launch_cpu", "--nprocs", str(args.nprocs),
                "--threads-per-proc", str(per_rank), "--log-dir", f"{WORK}/logs", "--"]
    many = train_command(args, args.batch_size // args.nprocs, f"{WORK}/many", launcher, None)
    return {f"1 process, {cores} threads": (one, {"OMP_NUM_THREADS": str(cores)}),
            "1 process, 1 thread": (one, {"OMP_NUM_THREADS": "1"}),
            f"{args.nprocs} gloo ranks, {per_rank} thread(s) each": (many, {})}


def command_lines(cmds):
    """setup name -> its command as the report shows it (environment first)."""
    return {name: "".join(f"{k}={v} " for k, v in env.items())
            + " ".join(cmd).replace(sys.executable, "python") for name, (cmd, env) in cmds.items()}


def run(name, cmd, extra_env):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **extra_env)
    busy0, total0 = measure.machine_cpu_seconds()
    log = os.path.join(WORK, re.sub(r"\W+", "_", name) + ".log")
    out = measure.run_logged(cmd, log, env, REPO, timeout=3600, what=name)
    busy1, total1 = measure.machine_cpu_seconds()
    inner = recipes.json_records("".join(out["lines"]), "train_inner")
    wps = [float(r["wps"]) for r in inner]
    return {"wps_intervals": wps, "wps": statistics.median(wps[1:]) if len(wps) > 1 else None,
            "bsz": sorted({r["bsz"] for r in inner}), "wall_s": round(out["wall_s"], 1),
            "cpu_s": round(out["cpu_s"], 1),     # children included (wait4)
            "other_load": round(measure.other_load(busy0, busy1, total0, total1,
                                                   out["cpu_s"]), 3)}


def report(res, argv) -> str:
    args, m, results = res["args"], res["machine"], res["runs"]
    names, cores, batch, n = list(results), m["usable_cores"], args["batch_size"], args["nprocs"]
    setups = zip(names, (cores, 1, max(1, cores // n)), (batch, batch, batch // n))
    rows = [[name, f"{threads} per process", per_process, f"{res['median_wps'][name]:,.0f}",
             ", ".join(format(r["wps"], ",.0f") for r in results[name]),
             ", ".join(format(r["other_load"], ".0%") for r in results[name])]
            for name, threads, per_process in setups]
    return "\n".join([
        "# Training tokens/s on CPU: 1 process vs gloo ranks", "",
        f"`python benchmarks/distributed_cpu.py {' '.join(argv)}`"
        f" on {m['cpu']}, {cores} usable cores, torch {m['torch']}, fairseq "
        f"{m['fairseq']}, git {m['git']}, {m['date']}.", "",
        f"`{args['arch']}`, {args['updates']} updates, global batch {batch} x "
        f"{args['tokens_per_sample']} tokens; tokens/s = fairseq's `wps`, median of the "
        f"`train_inner` intervals of {args['log_interval']} updates after the first.", "",
        reporting.md_table(["setup", "torch threads", "batch per process",
                            "tokens/s (median of runs)", "runs", "other load per run"], rows),
        "", f"Ratio {names[2]} / {names[0]}: {res['ratio']:.2f}.", "", "Commands:", "", "```",
        *res["commands"].values(), "```", ""] + ([res["notes"], ""] if res.get("notes") else []))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.report_only:
        res = reporting.read_json(args.output + ".json")
        return reporting.write_text(args.output + ".md", report(res, res.get("argv", [])))
    cores = reporting.usable_cores()
    cmds = commands(args, cores)
    os.makedirs(WORK, exist_ok=True)
    results = {name: [] for name in cmds}
    for rep in range(args.repeats):
        for name, (cmd, env) in cmds.items():
            r = run(name, cmd, env)
            results[name].append(r)
            print(f"run {rep + 1} {name}: {r['wps']:.0f} tokens/s (intervals "
                  f"{r['wps_intervals']}), other load {r['other_load']:.0%}", flush=True)
    summary = {name: statistics.median(r["wps"] for r in runs) for name, runs in results.items()}
    names = list(cmds)
    machine = {"cpu": reporting.cpu_model(), "usable_cores": cores,
               "torch": reporting.dist_version("torch"),
               "fairseq": reporting.dist_version("fairseq-fixed", "fairseq"),
               "git": reporting.git_revision(), "date": time.strftime("%Y-%m-%d %H:%M")}
    res = {"args": vars(args), "argv": argv, "machine": machine, "runs": results,
           "median_wps": summary, "ratio": summary[names[2]] / summary[names[0]],
           "commands": command_lines(cmds)}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    reporting.write_text(args.output + ".json", json.dumps(res, indent=1))
    reporting.write_text(args.output + ".md", report(res, argv))
    print(report(res, argv))


if __name__ == "__main__":
    main()
