"""A run killed with SIGKILL mid-epoch and restarted with the same command ends
exactly where the uninterrupted run ends; checkpoint copies are atomic."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_MODEL, USER_DIR, fairseq_cli

MAX_UPDATE, EVERY = 12, 4


def _args(data, save_dir):
    # dropout (global RNG), warm-up schedule, weight decay, clipping and EMA all
    # carry state that the restarted run must restore
    return [data, "--user-dir", USER_DIR, "--task", "masked_diffusion", "--criterion", "mdlm",
            *TINY_MODEL, "--dropout", "0.1", "--batch-size", "4", "--optimizer", "adam",
            "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--clip-norm", "1.0",
            "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "6",
            "--store-ema", "--ema-decay", "0.9", "--max-update", str(MAX_UPDATE),
            "--save-interval-updates", str(EVERY), "--no-epoch-checkpoints", "--seed", "7",
            "--max-valid-steps", "4",          # fairseq validates at every mid-epoch save
            "--num-workers", "0", "--cpu", "--log-format", "json", "--log-interval", "1",
            "--save-dir", save_dir]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _train_inner(text):
    out = {}
    for line in text.splitlines():
        if "| train_inner |" in line:
            rec = json.loads(line[line.index("{"):])
            out[int(rec["num_updates"])] = (rec["loss"], rec["lr"], rec["gnorm"])
    return out


def _final_valid(text):
    lines = [l for l in text.splitlines() if "| valid |" in l]
    return json.loads(lines[-1][lines[-1].index("{"):])


def _assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


def test_sigkill_mid_epoch_then_same_command_equals_uninterrupted(ptb_tiny, tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = fairseq_cli("train", *_args(ptb_tiny, ref_dir))
    ref_log = ref.stdout + ref.stderr

    # the same command, SIGKILLed as soon as it reports the checkpoint of update EVERY
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fairseq_cli.train", *map(str, _args(ptb_tiny, run_dir))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Saved checkpoint" in line and f"@ {EVERY} updates" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]

    last = _load(run_dir / "checkpoint_last.pt")
    k = last["optimizer_history"][-1]["num_updates"]
    itr = last["extra_state"]["train_iterator"]
    assert EVERY <= k < MAX_UPDATE and k % EVERY == 0
    assert itr["epoch"] == 1 and itr["iterations_in_epoch"] == k    # mid-epoch
    assert not (run_dir / f"checkpoint_1_{MAX_UPDATE}.pt").exists()

    resumed = fairseq_cli("train", *_args(ptb_tiny, run_dir))
    log = resumed.stdout + resumed.stderr
    assert f"(epoch 1 @ {k} updates)" in log and "Loaded checkpoint" in log

    # the updates after the restart log the same loss, learning rate and grad norm
    ref_steps, new_steps = _train_inner(ref_log), _train_inner(log)
    assert min(new_steps) == k + 1 and max(new_steps) == MAX_UPDATE
    assert {u: ref_steps[u] for u in new_steps} == new_steps

    a, b = _load(ref_dir / "checkpoint_last.pt"), _load(run_dir / "checkpoint_last.pt")
    diff = max((a["model"][n].double() - b["model"][n].double()).abs().max().item()
               for n in a["model"])
    print(f"resumed after update {k}: max |param difference| = {diff:.3g}")
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["extra_state"]["ema"], b["extra_state"]["ema"], "EMA")
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for p in sa:
        _assert_same_tensors(sa[p], sb[p], f"Adam state {p}")
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]
    assert a["optimizer_history"][-1]["lr_scheduler_state"] == \
        b["optimizer_history"][-1]["lr_scheduler_state"]
    assert a["optimizer_history"][-1]["num_updates"] == MAX_UPDATE
    # and the final validation bound (EMA weights) is the same number
    assert _final_valid(ref_log)["valid_loss"] == _final_valid(log)["valid_loss"]


def test_checkpoint_copies_replace_the_destination_in_one_step(tmp_path, monkeypatch):
    """fairseq copies the first checkpoint of a save to checkpoint_last.pt with
    PathManager.copy; with the plugin loaded a copy that dies half-way leaves the
    previous checkpoint_last.pt whole."""
    import mdlm_plugin  # noqa: F401  (installs the atomic copy)
    from fairseq.file_io import PathManager

    src, dst = tmp_path / "checkpoint_1_8.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"num_updates": 8, "w": torch.arange(1000)}, src)
    torch.save({"num_updates": 4, "w": torch.zeros(1000)}, dst)
    old = dst.read_bytes()

    def dies_half_way(a, b, **kw):          # a process killed in the middle of the copy
        with open(a, "rb") as f, open(b, "wb") as g:
            g.write(f.read()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == old
    monkeypatch.undo()

    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert _load(dst)["num_updates"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_8.pt",
                                                          "checkpoint_last.pt"]
