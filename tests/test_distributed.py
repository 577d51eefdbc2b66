"""Data-parallel training on CPU: two gloo ranks (mdlm_plugin.launch_cpu) make the
same updates as one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_MODEL, USER_DIR, fairseq_cli
from mdlm_plugin.errors import MDLMUserError
from mdlm_plugin.launch_cpu import rank_commands, supervise

UPDATES = 4


def _train_args(data, save_dir, *extra):
    return [str(data), "--user-dir", USER_DIR, "--task", "masked_diffusion",
            "--criterion", "mdlm", *TINY_MODEL, "--dropout", "0", "--optimizer", "adam",
            "--lr", "3e-3", "--max-update", str(UPDATES), "--save-interval-updates", "1",
            "--disable-validation", "--no-epoch-checkpoints", "--seed", "5",
            "--num-workers", "0", "--log-format", "json", "--log-interval", "1",
            "--save-dir", str(save_dir), *extra]


def _losses(text):
    """Logged training loss of each update (fairseq's train_inner lines)."""
    out = {}
    for line in text.splitlines():
        if "| train_inner |" in line:
            rec = json.loads(line[line.index("{"):])
            out[int(rec["num_updates"])] = float(rec["loss"])
    return out


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(ptb_tiny, tmp_path):
    """Rank r of 2 computes micro-batch r of each update, batch 4 each (fairseq shards
    the batches round-robin); one process with --batch-size 4 --update-freq 2 computes
    the same two micro-batches in turn. The criterion keys its noise on (seed, update,
    micro-batch), so the two must make the same updates."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one = fairseq_cli("train", *_train_args(ptb_tiny, one_dir, "--cpu", "--batch-size", "4",
                                            "--update-freq", "2"))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    two = subprocess.run(
        [sys.executable, "-m", "mdlm_plugin.launch_cpu", "--nprocs", "2",
         "--threads-per-proc", "1", "--log-dir", str(tmp_path / "logs"), "--",
         *_train_args(ptb_tiny, two_dir, "--batch-size", "4")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    log2 = two.stdout + two.stderr
    assert "as rank 1" in (tmp_path / "logs" / "rank1.log").read_text()

    # both saw 8 sequences of 32 tokens per update and logged the same loss
    loss1, loss2 = _losses(one.stdout + one.stderr), _losses(log2)
    assert sorted(loss1) == sorted(loss2) == list(range(1, UPDATES + 1))
    assert loss1 == pytest.approx(loss2, abs=2e-3)       # printed with 3 decimals
    assert '"bsz": "8"' in log2 and '"wpb": "256"' in log2

    step_size = None
    for k in range(1, UPDATES + 1):
        a = _params(one_dir / f"checkpoint_1_{k}.pt")
        b = _params(two_dir / f"checkpoint_1_{k}.pt")
        diff = _max_abs_diff(a, b)
        print(f"update {k}: max |param(1 process) - param(2 ranks)| = {diff:.3g}")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
        if k > 1:
            step_size = _max_abs_diff(a, prev)
            assert step_size > 1e-3 > 100 * diff   # an update moves far more than the gap
        prev = a
    assert step_size is not None


def test_launcher_refuses_flags_it_owns():
    with pytest.raises(MDLMUserError, match="--distributed-rank is set by the launcher"):
        rank_commands(["data", "--distributed-rank", "1"], 2, 1234)
    with pytest.raises(MDLMUserError, match="pytorch_ddp does not work on CPU"):
        rank_commands(["data", "--ddp-backend", "pytorch_ddp"], 2, 1234)
    cmds = rank_commands(["data", "--batch-size", "4"], 3, 1234)
    assert len(cmds) == 3
    for r, cmd in enumerate(cmds):
        assert cmd[cmd.index("--distributed-rank") + 1] == str(r)
        assert cmd[cmd.index("--distributed-world-size") + 1] == "3"
        assert "tcp://127.0.0.1:1234" in cmd and "--cpu" in cmd and "legacy_ddp" in cmd


def test_launcher_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdlm_plugin.launch_cpu", "--nprocs", "2",
                           "--", str(tmp_path), "--distributed-world-size", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "--distributed-world-size is set by the launcher" in proc.stderr


def test_a_failing_rank_stops_the_others(tmp_path):
    """Rank 1 fails at once; rank 0 would run for 10 minutes: the launcher returns
    rank 1's status and rank 0 is gone."""
    pid_file = tmp_path / "rank0.pid"
    rank0 = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w')"
             f".write(str(os.getpid())); time.sleep(600)"]
    rank1 = [sys.executable, "-c", f"import os, sys, time\n"
             f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\nsys.exit(3)"]
    status, rank = supervise([rank0, rank1], log_dir=str(tmp_path), grace=5)
    assert (status, rank) == (3, 1)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
