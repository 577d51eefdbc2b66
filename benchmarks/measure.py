"""What the benchmarks share besides ``mdlm_plugin.recipes`` and ``reporting``: their
command-line tables, measurements through psutil (CPU time of a process and of the whole
machine, to tell how much other jobs used; resident memory of a process tree), a timer for
a block of code, and a runner for a logged fairseq subprocess."""
import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import psutil

from mdlm_plugin import reporting


def parser(doc: str, flags: Dict[str, tuple], data: Optional[tuple] = None):
    """An argument parser described by the first paragraph of ``doc``: the optional
    positional ``data`` ((default, help)), then one option per ``flag: (type, default,
    help)``; a type in brackets (``[int]``) takes one or more values, ``bool`` is a switch."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if data:
        p.add_argument("data", nargs="?", default=data[0], help=data[1])
    for flag, (kind, default, text) in flags.items():
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            many = isinstance(kind, list)
            p.add_argument(flag, type=kind[0] if many else kind, nargs="+" if many else None,
                           default=default, help=text)
    return p


def thread_env(threads: Optional[int]) -> Dict[str, str]:
    """OMP_NUM_THREADS and MKL_NUM_THREADS for a child process (none for ``None``)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


# --------------------------------------------------------------------------- psutil

def machine_cpu_seconds():
    """(busy, total) CPU seconds of the whole machine, summed over cores."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(getattr(t, k) for k in ("user", "nice", "system", "idle", "iowait", "irq",
                                        "softirq", "steal") if hasattr(t, k))
    return total - idle, total      # guest time is already inside user


def other_load(busy0: float, busy1: float, total0: float, total1: float, own_cpu_s: float):
    """Share of all cores' time used by other processes between two readings."""
    return max(0.0, (busy1 - busy0) - own_cpu_s) / max(total1 - total0, 1e-9)


def _processes(pid: int, tree: bool) -> List[psutil.Process]:
    p = psutil.Process(pid)
    return [p] + (p.children(recursive=True) if tree else [])


def rss_mib(pid: int, tree: bool = False) -> Optional[float]:
    """Resident memory of a process (with ``tree``: summed with its descendants)."""
    try:
        return sum(q.memory_info().rss for q in _processes(pid, tree)) / 2 ** 20
    except psutil.Error:
        return None


def snapshot(pid: int, num_updates: float) -> Dict[str, float]:
    """CPU time of a live process (user + system) and of the machine, at an update count."""
    busy, total = machine_cpu_seconds()
    try:
        t = psutil.Process(pid).cpu_times()
        cpu = t.user + t.system
    except psutil.Error:
        cpu = None
    return {"num_updates": num_updates, "wall": time.monotonic(), "cpu": cpu,
            "machine_busy": busy, "machine_total": total}


class TreeMemorySampler(threading.Thread):
    """Peak summed RSS of a process tree, sampled every ``period`` seconds; on GPU also
    the peak memory nvidia-smi reports for the tree's processes."""

    def __init__(self, pid: int, smi_query=None, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.smi_query, self.period = pid, smi_query, period
        self.stop = threading.Event()
        self.rss_peak_mib = 0.0
        self.smi_peak_mib: Optional[float] = None

    def run(self):
        while not self.stop.is_set():
            self.rss_peak_mib = max(self.rss_peak_mib, rss_mib(self.pid, tree=True) or 0.0)
            if self.smi_query:
                try:
                    pids = [p.pid for p in _processes(self.pid, tree=True)]
                except psutil.Error:
                    pids = [self.pid]
                used = self.smi_query(pids)
                if used:
                    self.smi_peak_mib = max(self.smi_peak_mib or 0.0, used)
            self.stop.wait(self.period)


class Meter:
    """Wall time, this process's CPU time (all threads), the 1-minute load average
    before and after, and the share of all cores' time used by *other* processes."""

    def __enter__(self):
        self.load_before = os.getloadavg()[0]
        self.busy0, self.total0 = machine_cpu_seconds()
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = time.process_time() - self.cpu0
        busy1, total1 = machine_cpu_seconds()
        self.load_after = os.getloadavg()[0]
        self.other_load = min(1.0, other_load(self.busy0, busy1, self.total0, total1,
                                              self.cpu_s))
        return False

    def as_dict(self) -> Dict[str, object]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "load_before": round(self.load_before, 2),
                "load_after": round(self.load_after, 2), "other_load": self.other_load}


def nvidia_smi(*query: str) -> List[str]:
    """nvidia-smi's CSV lines for ``query`` (none without nvidia-smi); this process
    creates no CUDA context that would sit on the GPU during the runs."""
    smi = shutil.which("nvidia-smi")
    try:
        return subprocess.run([smi, *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=30).stdout.splitlines() if smi else []
    except (OSError, subprocess.SubprocessError):
        return []


def smi_used_mib(pids) -> float:
    """GPU memory nvidia-smi reports for the processes ``pids``."""
    rows = [[x.strip() for x in line.split(",")]
            for line in nvidia_smi("--query-compute-apps=pid,used_memory")]
    return sum(float(r[1]) for r in rows if len(r) == 2 and r[0].isdigit() and int(r[0]) in pids)


# --------------------------------------------------------------------------- subprocesses

def run_logged(cmd: List[str], log_file: str, env: Dict[str, str], cwd: str, timeout: float,
               on_line: Callable[[str, int], None] = lambda line, pid: None,
               gpu: bool = False, what: Optional[str] = None) -> Dict[str, object]:
    """Run ``cmd``, writing its output to ``log_file`` line by line and passing each line
    (and the pid) to ``on_line``. Returns its output, exit code, wall time, ``wait4``
    resource usage (exact CPU time and peak RSS, children included), whether ``timeout``
    killed it, and the sampled peak RSS of its process tree (and GPU memory with ``gpu``).
    With ``what`` (e.g. "mdlm_tiny run 2"), a failed run ends the benchmark."""
    start, lines, usage = time.monotonic(), [], None
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = TreeMemorySampler(proc.pid, smi_used_mib if gpu else None)
    sampler.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        with open(log_file, "w") as log:
            for line in proc.stdout:
                log.write(reporting.portable(line))     # logs are committed with results
                lines.append(line)
                on_line(line, proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timed_out = killer.finished.is_set()      # set once the timer fired
        killer.cancel()
        sampler.stop.set()
        sampler.join()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if what and proc.returncode != 0:
        why = f"killed after {timeout:g} s" if timed_out else f"exit status {proc.returncode}"
        sys.exit(f"error: {what} failed ({why}); full log {log_file}, last lines:\n"
                 + "".join(lines[-30:]))
    return {"lines": lines, "returncode": proc.returncode, "usage": usage,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.monotonic() - start,
            "tree_rss_peak_mib": sampler.rss_peak_mib or None, "smi_peak_mib": sampler.smi_peak_mib}


def binarized_data(path: str, repo: str) -> str:
    """``path`` (relative to ``repo`` unless absolute), checked to be fairseq-preprocess
    output; otherwise exit with one line saying how to make it."""
    data_dir = os.path.join(repo, path)
    missing = [f for f in ("dict.txt", "train.bin", "train.idx")
               if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        sys.exit(f"error: {data_dir} is not a binarized data directory (missing "
                 f"{', '.join(missing)}).\nMake the PTB one with:  bash examples/ptb/prepare.sh"
                 f"\nor pass another `fairseq-preprocess --only-source` output directory.")
    return data_dir
