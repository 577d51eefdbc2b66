"""Helpers shared by the corpus preparation scripts under examples/.

Each ``examples/<corpus>/prepare.py`` builds its fairseq dataset in a staging
directory next to OUT_DIR, checks it, and only then moves the files into
OUT_DIR, so an interrupted run never leaves a half-written dataset behind.
"""

import argparse
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = "run scripts/install.sh first (and activate its .venv)"
SPLITS = ("train", "valid", "test")


def corpus_parser(doc, name, raw_what="the plain-text and sentencepiece-encoded splits"):
    """The command line every prepare.py starts from: OUT_DIR (default data-bin/NAME) and
    --raw-dir (default data/NAME, where ``raw_what`` go), ``doc`` as the description."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default=f"data-bin/{name}",
                   help="fairseq data directory to write (default: %(default)s)")
    p.add_argument("--raw-dir", default=f"data/{name}",
                   help=f"where {raw_what} go (default: %(default)s)")
    return p


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(msg, flush=True)


def require_module(name, pip_name=None, import_it=True):
    """Import ``name`` (or only locate it) or exit with an installation hint."""
    pip_name = pip_name or name
    try:
        if import_it:
            return importlib.import_module(name)
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return None
    except ImportError as e:
        die(f"Python package '{pip_name}' is missing or broken ({e}); {INSTALL_HINT}")


def require_fairseq_preprocess():
    exe = shutil.which("fairseq-preprocess")
    if exe is None:
        die(f"'fairseq-preprocess' is not on PATH; {INSTALL_HINT}")
    return exe


def fairseq_mmap_dataset():
    """fairseq's MMapIndexedDataset class, imported without fairseq's INFO chatter."""
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    module = require_module("fairseq.data.indexed_dataset", pip_name="fairseq-fixed")
    return module.MMapIndexedDataset


def binarized_sizes(prefix):
    """(sentences, tokens incl. end-of-sentence) of a fairseq mmap dataset, or None."""
    prefix = str(prefix)
    if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
        return None
    ds_class = fairseq_mmap_dataset()
    import numpy as np  # a fairseq dependency, importable once fairseq is

    try:
        ds = ds_class(prefix)
        tokens = int(ds.sizes.sum())
        itemsize = np.dtype(ds._index.dtype).itemsize
    except Exception:  # unreadable or foreign files: treat as absent
        return None
    if os.path.getsize(prefix + ".bin") != tokens * itemsize:  # e.g. a truncated .bin
        return None
    return len(ds), tokens


def count_token(prefix, index):
    """How many times token id ``index`` occurs in a fairseq mmap dataset."""
    ds = fairseq_mmap_dataset()(str(prefix))
    return sum(int((ds[i] == index).sum()) for i in range(len(ds)))


def run_preprocess(args, workdir):
    """Run fairseq-preprocess with ``args``; its output goes to a log file in ``workdir``."""
    cmd = [require_fairseq_preprocess()] + [str(a) for a in args]
    log_path = Path(workdir) / "fairseq-preprocess.out"
    t0 = time.time()
    with open(log_path, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        die(
            f"fairseq-preprocess failed (exit {rc}): {' '.join(cmd)}\n  "
            + "\n  ".join(tail)
        )
    log(f"fairseq-preprocess done in {time.time() - t0:.1f}s")
    log_path.unlink()


def staging_dir(out_dir):
    """A fresh, empty directory next to ``out_dir`` to build into."""
    out_dir = Path(out_dir)
    stage = out_dir.parent / f".{out_dir.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def install_staged(stage, out_dir):
    """Move every entry of ``stage`` into ``out_dir`` (replacing same-named ones)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plog = Path(stage) / "preprocess.log"  # fairseq-preprocess's log names its --destdir
    if plog.is_file():
        plog.write_text(plog.read_text(encoding="utf-8").replace(str(stage), str(out_dir)), encoding="utf-8")
    for p in sorted(Path(stage).iterdir()):
        dst = out_dir / p.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(p, dst)
    Path(stage).rmdir()


def write_lines(path, lines):
    """Write lines (without newlines) to ``path``, one per line, UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)
