"""Training tokens/s on CPU: one fairseq-train process vs N gloo ranks
(``python -m mdlm_plugin.launch_cpu``), same model, same global batch.

    python benchmarks/distributed_cpu.py [DATA_DIR=data-bin/ptb] [--updates 30] [--repeats 2]

Runs are interleaved (1 process, 1 process with 1 thread, N ranks, 1 process, ...).
One process gets all usable cores as torch threads (and, as a reference, 1 thread)
and ``--batch-size B``; each rank gets cores / N threads and ``--batch-size B / N``,
so every update sees B sequences either way.
tokens/s is fairseq's ``wps`` of the ``train_inner`` lines after the first interval
(warm-up), median over intervals, then over runs. "other load" is the share of the
machine's CPU time used by other processes during a run (``/proc/stat`` minus the
run's own CPU time): runs with a high value are slowed by other jobs. Writes
``benchmarks/results/distributed_cpu.md`` (and ``.json``).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import REPO, cpu_model, dist_version, git_revision  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default=os.path.join(REPO, "data-bin", "ptb"))
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--arch", default="mdlm_tiny")
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                     "distributed_cpu"))
    return p.parse_args(argv)


def train_flags(args, batch, save_dir):
    return [args.data, "--user-dir", os.path.join(REPO, "mdlm_plugin"),
            "--task", "masked_diffusion", "--criterion", "mdlm", "--arch", args.arch,
            "--tokens-per-sample", str(args.tokens_per_sample), "--sample-break-mode", "none",
            "--batch-size", str(batch), "--optimizer", "adam", "--lr", "1e-3",
            "--max-update", str(args.updates), "--seed", "1", "--no-save",
            "--disable-validation", "--num-workers", "0", "--log-format", "json",
            "--log-interval", str(args.log_interval), "--save-dir", save_dir]


def commands(args, cores):
    if args.batch_size % args.nprocs:
        sys.exit(f"--batch-size {args.batch_size} is not divisible by --nprocs {args.nprocs}")
    one = ([sys.executable, "-m", "fairseq_cli.train",
            *train_flags(args, args.batch_size, "/tmp/mdlm_dist_bench/one"), "--cpu"],
           {"OMP_NUM_THREADS": str(cores)})
    per_rank = max(1, cores // args.nprocs)
    many = ([sys.executable, "-m", "mdlm_plugin.launch_cpu", "--nprocs", str(args.nprocs),
             "--threads-per-proc", str(per_rank), "--log-dir", "/tmp/mdlm_dist_bench/logs",
             "--", *train_flags(args, args.batch_size // args.nprocs,
                                "/tmp/mdlm_dist_bench/many")], {})
    one_thread = (one[0], {"OMP_NUM_THREADS": "1"})
    return {f"1 process, {cores} threads": one, "1 process, 1 thread": one_thread,
            f"{args.nprocs} gloo ranks, {per_rank} thread(s) each": many}


def machine_cpu():
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return (sum(v) - idle) / tick, sum(v) / tick


def run(cmd, extra_env):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **extra_env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = machine_cpu()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    busy1, total1 = machine_cpu()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wps = [float(json.loads(l[l.index("{"):])["wps"])
           for l in (proc.stdout + proc.stderr).splitlines() if "| train_inner |" in l]
    bsz = {json.loads(l[l.index("{"):])["bsz"]
           for l in (proc.stdout + proc.stderr).splitlines() if "| train_inner |" in l}
    other = max(0.0, (busy1 - busy0) - own) / max(total1 - total0, 1e-9)
    return {"wps_intervals": wps, "wps": statistics.median(wps[1:]) if len(wps) > 1 else None,
            "bsz": sorted(bsz), "wall_s": round(wall, 1), "cpu_s": round(own, 1),
            "other_load": round(other, 3)}


def main(argv=None):
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    cmds = commands(args, cores)
    results = {name: [] for name in cmds}
    for rep in range(args.repeats):
        for name, (cmd, env) in cmds.items():
            r = run(cmd, env)
            results[name].append(r)
            print(f"run {rep + 1} {name}: {r['wps']:.0f} tokens/s (intervals {r['wps_intervals']}), "
                  f"other load {r['other_load']:.0%}", flush=True)
    summary = {name: statistics.median(r["wps"] for r in runs) for name, runs in results.items()}
    names = list(cmds)
    ratio = summary[names[2]] / summary[names[0]]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    machine = {"cpu": cpu_model(), "usable_cores": cores, "torch": dist_version("torch"),
               "fairseq": dist_version("fairseq-fixed", "fairseq"), "git": git_revision(),
               "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(args.output + ".json", "w") as f:
        json.dump({"args": vars(args), "machine": machine, "runs": results,
                   "median_wps": summary, "ratio": ratio}, f, indent=1)
    lines = [
        "# Training tokens/s on CPU: 1 process vs gloo ranks",
        "",
        f"`python benchmarks/distributed_cpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f" on {machine['cpu']}, {cores} usable cores, torch {machine['torch']}, fairseq "
        f"{machine['fairseq']}, git {machine['git']}, {machine['date']}.",
        "",
        f"`{args.arch}`, {args.updates} updates, global batch {args.batch_size} x "
        f"{args.tokens_per_sample} tokens; tokens/s = fairseq's `wps`, median of the "
        f"`train_inner` intervals of {args.log_interval} updates after the first.",
        "",
        "| setup | torch threads | batch per process | tokens/s (median of runs) | runs | other load per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    threads = {names[0]: cores, names[1]: 1, names[2]: max(1, cores // args.nprocs)}
    per_proc = {names[0]: args.batch_size, names[1]: args.batch_size,
                names[2]: args.batch_size // args.nprocs}
    for name in names:
        runs = results[name]
        each = ", ".join(format(r["wps"], ",.0f") for r in runs)
        load = ", ".join(format(r["other_load"], ".0%") for r in runs)
        lines.append(f"| {name} | {threads[name]} per process | {per_proc[name]} | "
                     f"{summary[name]:,.0f} | {each} | {load} |")
    lines += ["", f"Ratio {names[2]} / {names[0]}: {ratio:.2f}.", "", "Commands:", "", "```"]
    for name, (cmd, env) in cmds.items():
        pre = " ".join(f"{k}={v}" for k, v in env.items())
        lines.append((pre + " " if pre else "") + " ".join(cmd).replace(sys.executable, "python"))
    lines += ["```", ""]
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
