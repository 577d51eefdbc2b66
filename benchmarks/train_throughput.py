#!/usr/bin/env python
"""Training throughput and peak memory: MDLM ``mdlm_tiny`` vs fairseq ``transformer_lm``.

Both models are trained through fairseq's own CLI (``fairseq-train``, one subprocess
per run) on the same data, with the same depth (4), width (256), heads (4), FFN
(1024), dropout (0.1), batch (32 x 128 tokens), optimizer (Adam, fixed lr) and
number of updates; runs are interleaved (MDLM, transformer_lm, MDLM, ...).

Throughput is fairseq's own ``wps`` (tokens per second) of the ``train_inner`` log
lines, the first interval(s) discarded as warm-up, median over the rest. Peak
memory is the child's peak resident set size (from ``wait4``'s rusage) on CPU, and
on GPU the peak ``torch.cuda.max_memory_allocated`` as fairseq reports it (through
``gb_free``) plus the process's peak in ``nvidia-smi``. Everything is reported as
MDLM / transformer_lm ratios, written as JSON, Markdown and a PNG chart.

    python benchmarks/train_throughput.py [DATA_DIR] [--updates 60] [--repeats 2]

DATA_DIR defaults to data-bin/ptb (make it with ``bash examples/ptb/prepare.sh``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, dist_version, git_revision  # noqa: E402
MDLM = "mdlm_tiny"
BASELINE = "transformer_lm"
MODELS = (MDLM, BASELINE)


# --------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Training throughput (tokens/s) and peak memory of MDLM mdlm_tiny vs "
                    "fairseq transformer_lm of the same size, through fairseq-train.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="?", default="data-bin/ptb",
                   help="fairseq-preprocess --only-source output directory (relative paths "
                        "are resolved against the repository root)")
    p.add_argument("--updates", type=int, default=60, help="training updates per run")
    p.add_argument("--log-interval", type=int, default=10,
                   help="updates per train_inner log line (one throughput sample)")
    p.add_argument("--warmup-intervals", type=int, default=1,
                   help="leading train_inner intervals discarded as warm-up")
    p.add_argument("--repeats", type=int, default=2, help="runs per model (interleaved)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (fixed)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of both models")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0,
                   help="fairseq data-loading workers (0 keeps each run one process, so "
                        "its peak RSS is the whole run's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--amp", action="store_true", help="on GPU, pass --amp to both runs")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS / MKL_NUM_THREADS for the runs (default: leave "
                        "torch's choice)")
    p.add_argument("--output-dir", default="benchmarks/results",
                   help="where results.json, results.md, throughput_memory.png and the "
                        "run logs go (relative to the repository root)")
    p.add_argument("--run-timeout", type=float, default=3600.0,
                   help="seconds before a single run is killed")
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


def resolve(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def check_data(data_dir: str) -> None:
    missing = [f for f in ("dict.txt", "train.bin", "train.idx")
               if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        sys.exit(f"error: {data_dir} is not a binarized data directory (missing "
                 f"{', '.join(missing)}).\nMake the PTB one with:  bash examples/ptb/prepare.sh"
                 f"\nor pass another `fairseq-preprocess --only-source` output directory.")


def pick_device(choice: str) -> str:
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if choice == "cuda" and not has_cuda:
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    if choice != "auto":
        return choice
    return "cuda" if has_cuda else "cpu"


def gpu_name() -> Optional[str]:
    """GPU 0's name, from nvidia-smi when present (so this process creates no CUDA
    context that would sit on the GPU during the runs)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
            if out.strip():
                return out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch
        return torch.cuda.get_device_name(0)
    except (ImportError, RuntimeError, AssertionError):
        return None


def fairseq_train_command() -> List[str]:
    """The fairseq-train console script of this interpreter's environment."""
    beside = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("fairseq-train")
    if found:
        return [found]
    sys.exit("error: fairseq-train not found (activate the environment with fairseq installed)")


def model_flags(model: str, args) -> List[str]:
    if model == MDLM:
        # mdlm_tiny: embed_dim 256, layers 4, attention_heads 4, FFN 4 x 256 (fixed in
        # the DiT block), dropout 0.1 (mdlm_plugin/models/mdlm.py).
        return ["--user-dir", os.path.join(REPO, "mdlm_plugin"),
                "--task", "masked_diffusion", "--criterion", "mdlm", "--arch", "mdlm_tiny",
                "--dropout", str(args.dropout)]
    # transformer_lm's config dataclass defaults --decoder-input-dim and
    # --decoder-output-dim to 512, which would silently add 256<->512 projections and
    # 512-wide embeddings: they must be given explicitly.
    return ["--task", "language_modeling", "--criterion", "cross_entropy",
            "--arch", "transformer_lm", "--decoder-layers", "4",
            "--decoder-embed-dim", "256", "--decoder-input-dim", "256",
            "--decoder-output-dim", "256", "--decoder-ffn-embed-dim", "1024",
            "--decoder-attention-heads", "4", "--dropout", str(args.dropout)]


def build_command(model: str, args, data_dir: str, device: str, save_dir: str) -> List[str]:
    cmd = fairseq_train_command() + [data_dir] + model_flags(model, args) + [
        "--tokens-per-sample", str(args.tokens_per_sample), "--sample-break-mode", "none",
        "--batch-size", str(args.batch_size),
        "--optimizer", "adam", "--lr", str(args.lr), "--lr-scheduler", "fixed",
        "--max-update", str(args.updates), "--seed", str(args.seed),
        "--log-format", "json", "--log-interval", str(args.log_interval),
        "--no-save", "--save-dir", save_dir, "--disable-validation",
        "--num-workers", str(args.num_workers),
    ]
    if device == "cpu":
        cmd.append("--cpu")
    elif args.amp:
        cmd.append("--amp")
    return cmd


# --------------------------------------------------------------------------- machine

def machine_info(device: str, threads_override: Optional[int]) -> Dict[str, object]:
    try:
        import torch
        torch_version = torch.__version__
        threads = threads_override or torch.get_num_threads()
    except ImportError:
        torch_version, threads = "not installed", None
    gpu = gpu_name() if device == "cuda" else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": device,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch_version,
        "fairseq": dist_version("fairseq-fixed", "fairseq"),
        "mdlm_plugin": dist_version("mdlm_plugin", "mdlm-plugin"),
        "git": git_revision(),
    }


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


TRAIN_INNER = re.compile(r"\| train_inner \| (\{.*\})\s*$")
PARAMS = re.compile(r"num\. shared model params: ([\d,]+)")
TOTAL_GPU_MEM = re.compile(r"total memory = ([\d.]+) GB")


def process_tree(root: int) -> List[int]:
    """``root`` and its descendants, from /proc (Linux)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def status_kib(pid: int, key: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a live process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_seconds():
    """(busy, total) CPU seconds of the whole machine, summed over cores (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None, None
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def snapshot(pid: int, num_updates: float) -> Dict[str, float]:
    busy, total = machine_cpu_seconds()
    return {"num_updates": num_updates, "wall": time.monotonic(),
            "cpu": process_cpu_seconds(pid), "machine_busy": busy, "machine_total": total}


def interval_stats(run: "Run", warmup: int) -> None:
    """CPU-time throughput and other processes' load over the measured intervals.

    ``run.snapshots[0]`` is taken when training starts, then one per train_inner
    line, so interval k (0-based) lies between snapshots k and k + 1.
    """
    tokens = cpu = busy_others = total = 0.0
    for k in range(warmup, len(run.intervals)):
        if k + 1 >= len(run.snapshots):
            break
        a, b, iv = run.snapshots[k], run.snapshots[k + 1], run.intervals[k]
        if a["cpu"] is None or b["cpu"] is None or "wpb" not in iv:
            continue
        d_cpu = b["cpu"] - a["cpu"]
        tokens += (b["num_updates"] - a["num_updates"]) * iv["wpb"]
        cpu += d_cpu
        if a["machine_busy"] is not None and b["machine_busy"] is not None:
            busy_others += max(0.0, (b["machine_busy"] - a["machine_busy"]) - d_cpu)
            total += b["machine_total"] - a["machine_total"]
    run.train_tokens_per_cpu_s = tokens / cpu if cpu > 0 else None
    run.other_load = busy_others / total if total > 0 else None


class MemorySampler(threading.Thread):
    """Samples the summed RSS of a process tree (and its GPU memory via nvidia-smi)."""

    def __init__(self, pid: int, gpu: bool, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.gpu, self.period = pid, gpu, period
        self.stop = threading.Event()
        self.rss_peak_kib = 0
        self.smi_peak_mib: Optional[float] = None
        self.smi = shutil.which("nvidia-smi") if gpu else None

    def run(self):
        while not self.stop.is_set():
            tree = process_tree(self.pid) if os.path.isdir("/proc") else [self.pid]
            total = sum(status_kib(p, "VmRSS") or 0 for p in tree)
            self.rss_peak_kib = max(self.rss_peak_kib, total)
            if self.smi:
                self._sample_gpu(set(tree))
            self.stop.wait(self.period)

    def _sample_gpu(self, pids):
        try:
            out = subprocess.run(
                [self.smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return
        used = 0.0
        for line in out.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
                try:
                    used += float(parts[1])
                except ValueError:
                    pass
        if used:
            self.smi_peak_mib = max(self.smi_peak_mib or 0.0, used)


def extract_model_config(line: str) -> Dict[str, object]:
    """The ``'model': {...}`` section of the config fairseq-train logs at start-up."""
    start = line.find("'model': {")
    if start < 0:
        return {}
    i = line.index("{", start)
    depth = 0
    for j in range(i, len(line)):
        depth += {"{": 1, "}": -1}.get(line[j], 0)
        if depth == 0:
            body = line[i + 1:j]
            break
    else:
        return {}
    config = {}
    for key, value in re.findall(r"'(\w+)': ('[^']*'|[^,{}\[\]]+)", body):
        value = value.strip().strip("'")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        config[key] = value
    return config


def check_architecture(model: str, config: Dict[str, object], log_text: str, args) -> Dict:
    """Depth, width, heads, FFN and dropout as the child actually built them.

    Depth and FFN are read off the printed module tree, width off every embedding,
    heads and dropout off the logged config.
    """
    embed_dims = [int(d) for d in re.findall(r"Embedding\(\d+, (\d+)", log_text)]
    ffn_in = len(re.findall(r"Linear\(in_features=256, out_features=1024", log_text))
    projections = len(re.findall(r"project_(?:in|out)_dim\): Linear", log_text))
    if model == MDLM:
        m = re.search(r"\((\d+)-(\d+)\): (\d+) x DiTBlock", log_text)
        layers = int(m.group(3)) if m else len(re.findall(r"\(\d+\): DiTBlock\(", log_text))
        heads = config.get("attention_heads")
        width = config.get("embed_dim")
    else:
        m = re.search(r"\((\d+)-(\d+)\): (\d+) x TransformerDecoderLayer", log_text)
        layers = int(m.group(3)) if m else len(
            re.findall(r"\(\d+\): TransformerDecoderLayer\w*\(", log_text))
        heads = config.get("decoder_attention_heads")
        width = config.get("decoder_embed_dim")
    # torch prints identical blocks once as "(0-3): 4 x Block(...)": the FFN Linear
    # shows up at least once when the blocks have it
    ffn_ok = ffn_in >= 1
    found = {"layers": layers, "width": width, "embedding_widths": sorted(set(embed_dims)),
             "heads": heads, "ffn_256x1024_present": ffn_ok, "dropout": config.get("dropout"),
             "width_projections": projections}
    problems = []
    if layers != 4:
        problems.append(f"{layers} layers, expected 4")
    if width != 256 or any(d != 256 for d in embed_dims):
        problems.append(f"width {width}, embeddings {sorted(set(embed_dims))}, expected 256")
    if heads != 4:
        problems.append(f"{heads} heads, expected 4")
    if not ffn_ok:
        problems.append("no 256 -> 1024 FFN layer")
    if projections:
        problems.append(f"{projections} input/output width projections")
    if config.get("dropout") is not None and abs(float(config["dropout"]) - args.dropout) > 1e-9:
        problems.append(f"dropout {config['dropout']}, expected {args.dropout}")
    found["problems"] = problems
    return found


def run_once(model: str, repeat: int, args, data_dir: str, device: str, log_dir: str,
             save_dir: str) -> Run:
    cmd = build_command(model, args, data_dir, device, save_dir)
    run = Run(model=model, repeat=repeat, command=cmd,
              log_file=os.path.join(log_dir, f"{model}_run{repeat}.log"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    run.load_before = [round(x, 2) for x in os.getloadavg()]
    gpu_total_gib = None
    gb_free_min = None
    log_lines: List[str] = []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = MemorySampler(proc.pid, gpu=(device == "cuda"))
    sampler.start()
    timed_out = threading.Event()

    def kill_on_timeout():
        timed_out.set()
        proc.kill()

    killer = threading.Timer(args.run_timeout, kill_on_timeout)
    killer.start()
    try:
        with open(run.log_file, "w") as log:
            for line in proc.stdout:
                log.write(line)
                log_lines.append(line)
                if "Start iterating over samples" in line:
                    run.snapshots = [snapshot(proc.pid, 0)]
                    rss = status_kib(proc.pid, "VmRSS")
                    if rss:
                        run.rss_at_train_start_mib = rss / 1024
                m = TRAIN_INNER.search(line)
                if m:
                    values = {}
                    for k, v in json.loads(m.group(1)).items():
                        try:
                            values[k] = float(v)
                        except (TypeError, ValueError):
                            pass
                    run.intervals.append(values)
                    if run.snapshots:
                        run.snapshots.append(snapshot(proc.pid, values.get("num_updates", 0)))
                    if "gb_free" in values:
                        gb_free_min = values["gb_free"] if gb_free_min is None else \
                            min(gb_free_min, values["gb_free"])
                    print(f"    update {int(values.get('num_updates', 0)):>5}  "
                          f"wps {values.get('wps', float('nan')):>9.1f}  "
                          f"loss {values.get('loss', float('nan')):.3f}", flush=True)
                    continue
                m = PARAMS.search(line)
                if m:
                    run.params = int(m.group(1).replace(",", ""))
                m = TOTAL_GPU_MEM.search(line)
                if m:
                    gpu_total_gib = float(m.group(1))
                if "fairseq_cli.train | {" in line and not run.config:
                    run.config = extract_model_config(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        killer.cancel()
        sampler.stop.set()
        sampler.join()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    run.wall_s = time.monotonic() - start
    run.returncode = proc.returncode
    run.load_after = [round(x, 2) for x in os.getloadavg()]
    if run.returncode != 0:
        tail = "".join(log_lines[-30:])
        if timed_out.is_set():
            sys.exit(f"error: {model} run {repeat} was killed after --run-timeout "
                     f"{args.run_timeout:g} s (log: {run.log_file})")
        sys.exit(f"error: {model} run {repeat} failed with exit status {run.returncode} "
                 f"(full log: {run.log_file}); last lines:\n{tail}")

    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.peak_rss_mib = usage.ru_maxrss / 1024            # Linux: KiB
    if run.rss_at_train_start_mib is not None:
        run.rss_train_increase_mib = run.peak_rss_mib - run.rss_at_train_start_mib
    run.tree_rss_peak_mib = sampler.rss_peak_kib / 1024 if sampler.rss_peak_kib else None
    run.gpu_smi_peak_mib = sampler.smi_peak_mib
    if gpu_total_gib is not None and gb_free_min is not None:
        run.gpu_peak_allocated_gib = gpu_total_gib - gb_free_min

    run.updates_done = int(run.intervals[-1]["num_updates"]) if run.intervals else 0
    measured = run.intervals[args.warmup_intervals:]
    run.wps_measured = [iv["wps"] for iv in measured if "wps" in iv]
    if not run.wps_measured:
        sys.exit(f"error: {model} run {repeat} logged {len(run.intervals)} train_inner "
                 f"intervals, none left after {args.warmup_intervals} warm-up one(s) "
                 f"(log: {run.log_file})")
    run.wps_median = statistics.median(run.wps_measured)
    run.wps_best = max(run.wps_measured)
    interval_stats(run, args.warmup_intervals)
    wpb = statistics.median(iv["wpb"] for iv in run.intervals if "wpb" in iv)
    tokens = wpb * run.updates_done
    run.tokens_per_cpu_s = tokens / run.cpu_s if run.cpu_s else None

    log_text = "".join(log_lines)
    run.arch_check = check_architecture(model, run.config, log_text, args)
    return run


# --------------------------------------------------------------------------- report

def median_of(runs: List[Run], attr: str) -> Optional[float]:
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100.0 * x


def fmt(x: Optional[float], spec: str = ",.1f") -> str:
    return "n/a" if x is None else format(x, spec)


def summarize(runs: List[Run], device: str) -> List[Dict[str, object]]:
    by_model = {m: [r for r in runs if r.model == m] for m in MODELS}
    metrics = [
        ("tokens/s (fairseq wps, median)", "wps_median", ",.1f", True),
        ("tokens/s (best interval)", "wps_best", ",.1f", False),
        ("tokens per CPU-second (measured intervals)", "train_tokens_per_cpu_s", ",.1f", False),
    ]
    if device == "cpu":
        metrics += [
            ("peak RSS (MiB)", "peak_rss_mib", ",.0f", True),
            ("RSS increase during training (MiB)", "rss_train_increase_mib", ",.0f", False),
        ]
    else:
        metrics += [
            ("peak torch allocated (GiB, from gb_free)", "gpu_peak_allocated_gib", ",.2f", True),
            ("peak nvidia-smi process memory (MiB)", "gpu_smi_peak_mib", ",.0f", False),
            ("peak host RSS (MiB)", "peak_rss_mib", ",.0f", False),
        ]
    metrics.append(("parameters", "params", ",.0f", False))
    rows = []
    for label, attr, spec, headline in metrics:
        a, b = median_of(by_model[MDLM], attr), median_of(by_model[BASELINE], attr)
        rows.append({"metric": label, "key": attr, "mdlm": a, "transformer_lm": b,
                     "ratio": ratio(a, b), "format": spec, "headline": headline})
    return rows


def markdown_report(header: Dict, runs: List[Run], summary, args, device: str) -> str:
    lines = ["# Training throughput: MDLM `mdlm_tiny` vs fairseq `transformer_lm`", ""]
    lines += ["```", header["command"], "```", ""]
    m = header["machine"]
    lines += ["| | |", "|---|---|"]
    for key in ("date", "cpu", "cpu_cores", "cpu_cores_usable", "torch_threads",
                "load_average", "device", "gpu", "python", "torch", "fairseq", "mdlm_plugin",
                "git"):
        if m.get(key) is not None:
            lines.append(f"| {key} | {m[key]} |")
    lines.append(f"| data | `{header['data']}` |")
    lines.append(f"| setup | {header['setup']} |")
    lines += ["", "## Summary (medians over runs; ratio = MDLM / transformer_lm)", "",
              "| metric | mdlm_tiny | transformer_lm | ratio |", "|---|---:|---:|---:|"]
    for row in summary:
        lines.append(f"| {row['metric']} | {fmt(row['mdlm'], row['format'])} | "
                     f"{fmt(row['transformer_lm'], row['format'])} | {fmt(row['ratio'], '.3f')} |")
    lines += ["", "## Runs (in execution order)", ""]
    lines += ["| # | model | tokens/s (median) | best | tokens/s per interval | tokens/CPU-s | "
              "other load | peak RSS MiB | RSS increase MiB | CPU s | wall s |",
              "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs, 1):
        per = ", ".join(f"{w:,.0f}" for w in r.wps_measured)
        lines.append(f"| {i} | {r.model} | {fmt(r.wps_median)} | {fmt(r.wps_best)} | {per} | "
                     f"{fmt(r.train_tokens_per_cpu_s)} | {fmt(pct(r.other_load), '.0f')}% | "
                     f"{fmt(r.peak_rss_mib, ',.0f')} | {fmt(r.rss_train_increase_mib, ',.0f')} | "
                     f"{r.cpu_s:,.1f} | {r.wall_s:,.1f} |")
    if device == "cuda":
        lines += ["", "| # | model | peak torch allocated GiB | nvidia-smi peak MiB |",
                  "|---:|---|---:|---:|"]
        for i, r in enumerate(runs, 1):
            lines.append(f"| {i} | {r.model} | {fmt(r.gpu_peak_allocated_gib, '.2f')} | "
                         f"{fmt(r.gpu_smi_peak_mib, ',.0f')} |")
    lines += ["", "## Configuration check (as the runs built it)", "",
              "| model | params | layers | width | embedding widths | heads | FFN 256->1024 | "
              "dropout |", "|---|---:|---:|---:|---|---:|---|---:|"]
    seen = set()
    for r in runs:
        if r.model in seen:
            continue
        seen.add(r.model)
        c = r.arch_check
        lines.append(f"| {r.model} | {fmt(r.params, ',.0f')} | {c['layers']} | {c['width']} | "
                     f"{c['embedding_widths']} | {c['heads']} | {c['ffn_256x1024_present']} | "
                     f"{c['dropout']} |")
    lines += ["", "## Commands", ""]
    for model in MODELS:
        cmd = next(r.command for r in runs if r.model == model)
        lines += [f"{model}:", "```", shlex.join(cmd), "```", ""]
    lines += [
        "Notes: throughput is fairseq's `wps` of the `train_inner` lines after the first "
        f"{args.warmup_intervals} interval(s) of {args.log_interval} updates; both "
        "models count the same non-padding tokens per batch. Peak RSS is the kernel's "
        "high-water mark of the fairseq-train process (includes Python, torch and fairseq "
        "themselves); 'RSS increase' subtracts the RSS at the start of training. "
        "'tokens per CPU-second' divides the tokens of the measured intervals by the "
        "fairseq-train process's user+system CPU time over them: less sensitive to other "
        "load on the machine than wall-clock tokens/s. 'other load' is the share of all "
        "cores' time that other processes used during the measured intervals: wall-clock "
        "numbers from runs with a high one are unreliable.", ""]
    return "\n".join(lines)


def plot(runs: List[Run], summary, path: str, device: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem_key = "peak_rss_mib" if device == "cpu" else "gpu_peak_allocated_gib"
    mem_label = "peak RSS (MiB)" if device == "cpu" else "peak torch allocated (GiB)"
    panels = [("wps_median", "training tokens/s (median)"), (mem_key, mem_label)]
    rows = {row["key"]: row for row in summary}
    colors = {MDLM: "#d95f02", BASELINE: "#1b9e77"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (key, label) in zip(axes, panels):
        row = rows[key]
        heights = [row["mdlm"] or 0.0, row["transformer_lm"] or 0.0]
        bars = ax.bar(range(2), heights, color=[colors[m] for m in MODELS], width=0.6)
        top = max(heights)
        for x, model in enumerate(MODELS):
            ys = [getattr(r, key) for r in runs if r.model == model and getattr(r, key) is not None]
            top = max([top] + ys)
            ax.scatter([x] * len(ys), ys, color="black", s=14, zorder=3,
                       label="individual runs" if x == 0 else None)
        for bar, h in zip(bars, heights):
            ax.annotate(f"{h:,.0f}" if h >= 10 else f"{h:.2f}", (bar.get_x() + bar.get_width() / 2, h),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_xticks(range(2))
        ax.set_xticklabels(MODELS)
        ax.set_ylabel(label)
        r = row["ratio"]
        ax.set_title(f"{label}\nMDLM / transformer_lm = {fmt(r, '.3f')}", fontsize=10)
        ax.set_ylim(0, max(top, 1e-9) * 1.18)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    data_dir = resolve(args.data)
    check_data(data_dir)
    device = pick_device(args.device)
    if args.amp and device != "cuda":
        sys.exit("error: --amp needs a GPU run (torch sees no CUDA device)")
    out_dir = resolve(args.output_dir)
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)

    command = shlex.join([sys.executable] + sys.argv) if argv is None else \
        shlex.join([sys.executable, __file__] + list(argv))
    machine = machine_info(device, args.threads)
    setup = (f"{args.batch_size} x {args.tokens_per_sample} tokens/batch, {args.updates} "
             f"updates/run (log every {args.log_interval}, first {args.warmup_intervals} "
             f"interval(s) = warm-up), Adam lr {args.lr:g} fixed, dropout {args.dropout:g}, "
             f"{args.repeats} interleaved run(s)/model, seed {args.seed}"
             + (", --amp" if args.amp else "")
             + (f", {args.threads} thread(s)" if args.threads else ""))
    header = {"command": command, "machine": machine, "data": data_dir, "setup": setup}

    print("=" * 78)
    print("MDLM mdlm_tiny vs fairseq transformer_lm: training throughput and peak memory")
    print("=" * 78)
    print(f"{'command':<16}: {command}")
    for key in ("date", "cpu", "cpu_cores", "cpu_cores_usable", "torch_threads", "load_average",
                "device", "gpu", "python", "torch", "fairseq", "mdlm_plugin", "git"):
        if machine.get(key) is not None:
            print(f"{key:<16}: {machine[key]}")
    print(f"{'data':<16}: {data_dir}")
    print(f"{'setup':<16}: {setup}")
    print()

    runs: List[Run] = []
    with tempfile.TemporaryDirectory(prefix="mdlm-bench-") as save_dir:
        for repeat in range(1, args.repeats + 1):
            for model in MODELS:
                print(f"[run {len(runs) + 1}/{2 * args.repeats}] {model} (repeat {repeat}) "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                if not runs or len(runs) < 2:
                    print("    $ " + shlex.join(build_command(model, args, data_dir, device,
                                                             save_dir)), flush=True)
                run = run_once(model, repeat, args, data_dir, device, log_dir, save_dir)
                if run.arch_check["problems"]:
                    sys.exit(f"error: {model} was not built as specified: "
                             f"{'; '.join(run.arch_check['problems'])} (log: {run.log_file})")
                print(f"    -> {fmt(run.wps_median)} tokens/s (median of "
                      f"{len(run.wps_measured)}; best {fmt(run.wps_best)}), "
                      f"{fmt(run.train_tokens_per_cpu_s)} tokens/CPU-s, other load "
                      f"{fmt(pct(run.other_load), '.0f')}%, peak RSS "
                      f"{fmt(run.peak_rss_mib, ',.0f')} MiB, {run.wall_s:.1f} s wall, "
                      f"{fmt(run.params, ',.0f')} params", flush=True)
                runs.append(run)

    summary = summarize(runs, device)
    print()
    print("Parameters: " + ", ".join(
        f"{m} {fmt(next(r.params for r in runs if r.model == m), ',.0f')}" for m in MODELS))
    print()
    print("Runs (execution order):")
    print(f"  {'#':>2}  {'model':<15}{'tokens/s':>10}{'best':>9}  {'per interval':<36}"
          f"{'tok/CPU-s':>10}{'others':>8}{'peak RSS MiB':>13}{'wall s':>8}")
    for i, r in enumerate(runs, 1):
        per = ", ".join(f"{w:.0f}" for w in r.wps_measured)
        print(f"  {i:>2}  {r.model:<15}{fmt(r.wps_median):>10}{fmt(r.wps_best):>9}  {per:<36}"
              f"{fmt(r.train_tokens_per_cpu_s):>10}{fmt(pct(r.other_load), '.0f') + '%':>8}"
              f"{fmt(r.peak_rss_mib, ',.0f'):>13}{r.wall_s:>8.0f}")
        if device == "cuda":
            print(f"      GPU: peak torch allocated {fmt(r.gpu_peak_allocated_gib, '.2f')} GiB, "
                  f"nvidia-smi peak {fmt(r.gpu_smi_peak_mib, ',.0f')} MiB")
    print()
    print("Summary (median over runs; ratio = MDLM / transformer_lm):")
    width = max(len(r["metric"]) for r in summary) + 2
    print(f"  {'metric':<{width}}{'mdlm_tiny':>14}{'transformer_lm':>16}{'ratio':>9}")
    for row in summary:
        print(f"  {row['metric']:<{width}}{fmt(row['mdlm'], row['format']):>14}"
              f"{fmt(row['transformer_lm'], row['format']):>16}{fmt(row['ratio'], '.3f'):>9}")

    results = {
        "header": header,
        "settings": {k: v for k, v in vars(args).items()},
        "summary": [{k: v for k, v in row.items() if k != "format"} for row in summary],
        "ratios": {row["key"]: row["ratio"] for row in summary},
        "runs": [asdict(r) for r in runs],
    }
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    png_path = os.path.join(out_dir, "throughput_memory.png")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(md_path, "w") as f:
        f.write(markdown_report(header, runs, summary, args, device))
    plot(runs, summary, png_path, device,
         f"{machine['cpu'] if device == 'cpu' else machine['gpu']}, torch {machine['torch']}, "
         f"{args.batch_size}x{args.tokens_per_sample} tokens, {args.repeats} runs/model")
    print()
    print(f"wrote {json_path}\n      {md_path}\n      {png_path}\n      {log_dir}/*.log")


if __name__ == "__main__":
    main()
