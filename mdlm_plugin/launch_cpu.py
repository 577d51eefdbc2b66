"""Data-parallel fairseq-train on CPU: one gloo process per rank.

fairseq's own launch paths do not work on CPU: ``--cpu --distributed-world-size N``
spawns ``min(cuda devices, N)`` = 0 processes and exits 0, and under ``torchrun``
fairseq divides by ``torch.cuda.device_count()``. What works is one process per rank
started by hand with

    --cpu --distributed-backend gloo --distributed-no-spawn --distributed-world-size N
    --distributed-rank R --distributed-init-method tcp://127.0.0.1:PORT --ddp-backend legacy_ddp

(``legacy_ddp`` because the default ``pytorch_ddp`` passes GPU device ids). This
module does exactly that, without patching fairseq::

    python -m mdlm_plugin.launch_cpu --nprocs 2 -- data-bin/ptb --user-dir mdlm_plugin \\
        --task masked_diffusion --criterion mdlm --arch mdlm_tiny --batch-size 16 ...

Everything after ``--`` is the usual fairseq-train command line. The launcher picks a
free local port, gives each rank ``--threads-per-proc`` torch threads (default: the
usable cores divided by the ranks), shows rank 0's output and writes the other ranks'
to ``--log-dir``, forwards SIGINT/SIGTERM/SIGHUP to every rank, and returns the first
non-zero exit status, stopping the other ranks when one fails. If the launcher itself
is killed, the kernel kills the ranks (``PR_SET_PDEATHSIG``), so no orphan keeps the
port or writes checkpoints. ``--batch-size`` is per rank: the global batch is
N x batch x ``--update-freq``. On GPUs use fairseq's own launcher
(``--distributed-world-size``, torchrun, SLURM), not this one.
"""
import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

from .errors import MDLMUserError, install_excepthook

# flags the launcher sets itself: passing them after "--" is an error
OWNED_FLAGS = ("--distributed-world-size", "--distributed-rank", "--distributed-init-method",
               "--distributed-backend", "--distributed-no-spawn", "--distributed-port",
               "--distributed-num-procs", "--device-id", "--local-rank", "--local_rank")
# data-parallel backends that work with gloo on CPU modules
CPU_DDP_BACKENDS = ("legacy_ddp", "no_c10d")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def rank_commands(train_args: Sequence[str], nprocs: int, port: int,
                  host: str = "127.0.0.1") -> List[List[str]]:
    """The fairseq-train command line of each rank."""
    if nprocs < 1:
        raise MDLMUserError(f"--nprocs must be >= 1, got {nprocs}")
    if not train_args:
        raise MDLMUserError("no fairseq-train arguments: put them after '--', e.g. "
                            "python -m mdlm_plugin.launch_cpu --nprocs 2 -- data-bin/ptb "
                            "--user-dir mdlm_plugin --task masked_diffusion ...")
    for a in train_args:
        if a.split("=", 1)[0] in OWNED_FLAGS:
            raise MDLMUserError(f"{a.split('=', 1)[0]} is set by the launcher (one gloo "
                                f"process per rank); leave it out of the fairseq-train "
                                f"arguments")
    ddp = _flag_value(train_args, "--ddp-backend")
    if ddp is not None and ddp not in CPU_DDP_BACKENDS:
        raise MDLMUserError(f"--ddp-backend {ddp} does not work on CPU with gloo: use one "
                            f"of {', '.join(CPU_DDP_BACKENDS)} (the launcher's default is "
                            f"legacy_ddp)")
    extra = [] if "--cpu" in train_args else ["--cpu"]
    if ddp is None:
        extra += ["--ddp-backend", "legacy_ddp"]
    base = [sys.executable, "-m", "fairseq_cli.train", *train_args, *extra,
            "--distributed-backend", "gloo", "--distributed-no-spawn",
            "--distributed-world-size", str(nprocs),
            "--distributed-init-method", f"tcp://{host}:{port}"]
    return [base + ["--distributed-rank", str(r)] for r in range(nprocs)]


def _die_with_parent():
    """Runs in each child before exec: SIGKILL it when the launcher dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _exit_status(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a shell would report it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(commands: Sequence[Sequence[str]], env_per_rank=None, log_dir=None,
              poll_interval: float = 0.05,
              grace: float = GRACE_SECONDS) -> Tuple[int, Optional[int]]:
    """Run the commands (rank 0 first) until all end. Returns ``(status, rank)``:
    the first non-zero exit status (128 + N for a rank killed by signal N) and that
    rank, after stopping the others; ``(0, None)`` when every rank succeeded.

    Rank 0 writes to this process's stdout/stderr, rank r > 0 to
    ``log_dir/rank{r}.log`` (discarded without ``log_dir``). Each rank runs in its
    own session, so a terminal's Ctrl-C reaches the ranks once, through the
    launcher, which forwards SIGINT/SIGTERM/SIGHUP to all of them.
    """
    procs, logs = [], []
    received = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        for r, cmd in enumerate(commands):
            if r == 0:
                out = None
            elif log_dir is not None:
                out = open(os.path.join(log_dir, f"rank{r}.log"), "wb")
                logs.append(out)
            else:
                out = subprocess.DEVNULL
            env = env_per_rank[r] if env_per_rank is not None else None
            procs.append(subprocess.Popen(list(cmd), stdout=out, stderr=out, env=env,
                                          start_new_session=True,
                                          preexec_fn=_die_with_parent))
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c is not None and c != 0]
            if failed:
                _stop(procs, grace)
                return _exit_status(codes[failed[0]]), failed[0]
            if all(c is not None for c in codes):
                return 0, None
            time.sleep(poll_interval)
    finally:
        _stop(procs, grace)
        for s, h in previous.items():
            signal.signal(s, h)
        for f in logs:
            f.close()


def _stop(procs, grace):
    """SIGTERM the ranks still running, then SIGKILL those alive after ``grace`` s."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, train_args = argv[:cut], argv[cut + 1:]
    else:
        own, train_args = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m mdlm_plugin.launch_cpu",
        description="fairseq-train data-parallel on CPU: one gloo process per rank. "
                    "Usage: python -m mdlm_plugin.launch_cpu --nprocs 2 -- "
                    "<fairseq-train arguments>")
    parser.add_argument("--nprocs", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port of the rendezvous (default: a free one)")
    parser.add_argument("--threads-per-proc", type=int, default=0,
                        help="OMP_NUM_THREADS of each rank (default: usable cores / "
                             "nprocs, at least 1; an OMP_NUM_THREADS already set wins)")
    parser.add_argument("--log-dir", default=None,
                        help="where ranks 1.. write their output (default: a new "
                             "temporary directory, printed at start)")
    opts = parser.parse_args(own)

    commands = rank_commands(train_args, opts.nprocs, opts.port or free_port())
    threads = opts.threads_per_proc or max(1, len(os.sched_getaffinity(0)) // opts.nprocs)
    envs = []
    for r in range(opts.nprocs):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if opts.threads_per_proc or "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        envs.append(env)
    log_dir = opts.log_dir or tempfile.mkdtemp(prefix="mdlm_launch_cpu_")
    os.makedirs(log_dir, exist_ok=True)
    print(f"mdlm_plugin.launch_cpu: {opts.nprocs} gloo ranks, "
          f"{envs[0].get('OMP_NUM_THREADS', 'default')} threads each, ranks 1.. log to "
          f"{log_dir}", file=sys.stderr, flush=True)
    status, rank = supervise(commands, envs, log_dir)
    if status != 0:
        if rank:
            with open(os.path.join(log_dir, f"rank{rank}.log"), errors="replace") as f:
                sys.stderr.write("".join(f.readlines()[-20:]))
        print(f"mdlm_plugin.launch_cpu: rank {rank} exited with status {status}; the "
              f"other ranks were stopped (logs of ranks 1..: {log_dir})",
              file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    install_excepthook()
    sys.exit(main())
