#!/usr/bin/env python
"""Translation: MDLM against fairseq's autoregressive transformer and CMLM, one command.

    python examples/translation/compare.py --data data-bin/bible_ja_en --seeds 1 2 3

On one binarized bilingual data set (``fairseq-preprocess --joined-dictionary``; the
default, the Japanese -> English Bible, is prepared by examples/bible/prepare.sh when
missing) every model is trained by fairseq-train with the same updates, batch (sentence
pairs), optimizer, schedule, dropout and seeds, and its last checkpoint translates the
test split with fairseq-generate --scoring sacrebleu, one thread:

* ``transformer``: fairseq's autoregressive ``transformer`` (beam 1, i.e. greedy, and
  the other ``--beams``);
* ``cmlm``: fairseq's ``cmlm_transformer`` (``--task translation_lev --noise random_mask
  --criterion nat_loss``), mask-predict with T decoder passes for each
  ``--cmlm-iterations`` T;
* ``mdlm``: the plugin's ``mdlm_translation`` model, each of ``--samplers`` at each of
  ``--steps``; with ``--distill`` also ``mdlm_kd``, trained on the training sources with
  the transformer's beam-5 translations as targets (sequence-level distillation).

Outputs in --out: results.json (every training and decoding, with its command; a rerun
recomputes nothing recorded there), results.md, bleu_calls.png (BLEU against network
calls per sentence). See examples/translation/README.md.
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)     # this checkout's mdlm_plugin, installed or not
sys.path.insert(1, os.path.join(REPO, "examples"))
from mdlm_plugin import recipes, reporting  # noqa: E402
from mdlm_plugin.diffusion.samplers import SAMPLERS  # noqa: E402
from mdlm_plugin.reporting import md_table  # noqa: E402
from prep_common import binarized_sizes  # noqa: E402


def _lm_compare():
    """examples/compare/compare.py (the LM comparison), whose runner, recipe key and
    seed statistics this comparison shares; loaded by path, as this file's name is its."""
    spec = importlib.util.spec_from_file_location(
        "lm_compare", os.path.join(REPO, "examples", "compare", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lm = _lm_compare()
CompareError = lm.CompareError

# a row's model -> its fairseq recipe (mdlm_plugin/recipes.py)
FAMILY = {"transformer": "translation_transformer", "cmlm": "translation_cmlm",
          "mdlm": "translation_mdlm", "mdlm_kd": "translation_mdlm"}
MODELS = ("transformer", "cmlm", "mdlm")
DEFAULT_DATA = os.path.join("data-bin", "bible_ja_en")
SPLITS = ("train", "valid", "test")
# fairseq refuses to load these checkpoints with torch >= 2.6's weights_only default (the
# legacy transformer / cmlm configs hold an argparse.Namespace); they are this script's own
TRUSTED_CHECKPOINTS = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}    # every decoding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="fairseq-preprocess --joined-dictionary "
                   "output (the default is prepared by examples/bible/prepare.sh if missing)")
    p.add_argument("--source-lang", help="default: the one language pair in --data")
    p.add_argument("--target-lang")
    p.add_argument("--work-dir", help="runs (default checkpoints/translation_<data name>)")
    p.add_argument("--out", help="results (default examples/translation/results/<data name>)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="training seeds")
    p.add_argument("--distill", action="store_true",
                   help="add mdlm_kd: MDLM trained on the transformer's (first seed) beam-5 "
                   "translations of the training sources (needs the transformer row)")
    g = p.add_argument_group("training (the same for every model)")
    for flag, kind, default, text in (
            ("--max-update", int, 4000, ""), ("--batch-size", int, 64, "sentence pairs"),
            ("--lr", float, 1e-3, "Adam, inverse-sqrt schedule"),
            ("--warmup-updates", int, 1000, ""), ("--dropout", float, 0.1, ""),
            ("--embed-dim", int, 256, "width (FFN 4x) of every model"),
            ("--heads", int, 4, ""), ("--layers", int, 4, "MDLM's layers"),
            ("--cond-dim", int, 128, "MDLM's time-conditioning width"),
            ("--target-canvas", int, 128, "MDLM's target positions"),
            ("--max-positions", int, 320, "MDLM's positions: canvas + the longest source"),
            ("--encoder-layers", int, 3, "transformer and CMLM"),
            ("--decoder-layers", int, 3, "transformer and CMLM"),
            ("--threads", int, 0, "training threads (0: torch's default)")):
        g.add_argument(flag, type=kind, default=default, help=text or None)
    e = p.add_argument_group("evaluation (one thread)")
    e.add_argument("--beams", type=int, nargs="+", default=[1, 5], help="transformer")
    e.add_argument("--cmlm-iterations", type=int, nargs="+", default=[4, 10],
                   help="mask-predict decoder passes T (--iter-decode-max-iter T-1)")
    e.add_argument("--samplers", nargs="+", default=["ddpm_cache", "first_hitting", "confidence"],
                   choices=SAMPLERS, help="MDLM (first_hitting: one token per pass, "
                   "whatever --steps)")
    e.add_argument("--steps", type=int, nargs="+", default=[10, 32], help="MDLM")
    e.add_argument("--temperature", type=float, default=0.1, help="MDLM")
    e.add_argument("--gen-batch-size", type=int, default=64)
    e.add_argument("--post-process", help="fairseq-generate --post-process before scoring "
                   "(default: sentencepiece when --data holds spm.model)")
    p.add_argument("--report-only", action="store_true", help="re-render from results.json")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: choose from {', '.join(MODELS)} (got {args.models})")
    if args.distill:
        if "transformer" not in args.models:
            p.error("--distill needs the transformer row (its translations are the targets)")
        args.models.append("mdlm_kd")
    if len(set(args.seeds)) < len(args.seeds) or min(args.seeds) < 1:
        p.error("--seeds must be distinct positive integers")
    for name in ("max_update", "batch_size", "embed_dim", "heads", "layers", "target_canvas",
                 "encoder_layers", "decoder_layers", "gen_batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.beams + args.steps) <= 0 or min(args.cmlm_iterations) < 1:
        p.error("--beams, --steps and --cmlm-iterations must be positive")
    if args.max_positions <= args.target_canvas:
        p.error("--max-positions must exceed --target-canvas (the source needs positions)")
    name = os.path.basename(os.path.normpath(args.data))
    args.work_dir = args.work_dir or os.path.join("checkpoints", f"translation_{name}")
    args.out = args.out or os.path.join(REPO, "examples", "translation", "results", name)
    return args


# --------------------------------------------------------------------------- data

def language_pair(data: str, src: Optional[str], tgt: Optional[str]) -> Tuple[str, str]:
    """The (source, target) languages of a fairseq bilingual directory, or one error that
    says what the directory lacks."""
    hint = ("a bilingual data directory is fairseq-preprocess --source-lang S --target-lang T "
            "--joined-dictionary output (train/valid/test.S-T.S and .T, .bin and .idx; "
            "dict.S.txt = dict.T.txt); examples/bible/prepare.sh DIR writes one")
    if not os.path.isdir(data):
        raise CompareError(f"{data}: no such directory; {hint}")
    pairs = sorted({m.groups() for f in os.listdir(data)
                    for m in [re.fullmatch(r"train\.([^.]+)-([^.]+)\.\1\.idx", f)] if m})
    if src and tgt:
        pairs = [(s, t) for s, t in pairs if (s, t) == (src, tgt)]
    if len(pairs) != 1:
        mono = os.path.isfile(os.path.join(data, "dict.txt"))
        found = "no" if not pairs else f"several ({', '.join('-'.join(x) for x in pairs)}: pass " \
            "--source-lang and --target-lang)"
        raise CompareError(
            f"{data} holds {found} bilingual training data" + (
                " (its dict.txt is monolingual data, fairseq-preprocess --only-source)"
                if mono and not pairs else "") + f"; {hint}")
    src, tgt = pairs[0]
    missing = [f"{s}.{src}-{tgt}.{lang}.{ext}" for s in SPLITS for lang in (src, tgt)
               for ext in ("bin", "idx")
               if not os.path.isfile(os.path.join(data, f"{s}.{src}-{tgt}.{lang}.{ext}"))]
    dicts = [os.path.join(data, f"dict.{lang}.txt") for lang in (src, tgt)]
    missing += [os.path.basename(d) for d in dicts if not os.path.isfile(d)]
    if missing:
        raise CompareError(f"{data} lacks {', '.join(missing)}; {hint}")
    with open(dicts[0]) as a, open(dicts[1]) as b:
        if a.read() != b.read():
            raise CompareError(f"{data}: dict.{src}.txt and dict.{tgt}.txt differ; every model "
                               f"here shares one embedding table: {hint}")
    return src, tgt


def prepare_data(args) -> None:
    """The default data set is prepared when missing; any other must exist."""
    if args.data == DEFAULT_DATA and not os.path.isdir(args.data):
        cmd = ["bash", os.path.join(REPO, "examples", "bible", "prepare.sh"), args.data]
        print(f"preparing the Bible: $ {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise CompareError(f"data preparation failed: {shlex.join(cmd)}")
    args.source_lang, args.target_lang = language_pair(args.data, args.source_lang,
                                                       args.target_lang)
    if args.post_process is None:
        spm = os.path.isfile(os.path.join(args.data, "spm.model"))
        args.post_process = "sentencepiece" if spm else None


def split_sizes(data: str, split: str, args) -> Dict[str, int]:
    out = {}
    for side, lang in (("source", args.source_lang), ("target", args.target_lang)):
        sizes = binarized_sizes(os.path.join(data, f"{split}.{args.source_lang}-"
                                                   f"{args.target_lang}.{lang}"))
        if sizes is None:
            raise CompareError(f"{data}: the {split} split's {lang} side is unreadable; "
                               f"re-run fairseq-preprocess")
        out["sentences"], out[f"{side}_tokens"] = sizes
    return out


# --------------------------------------------------------------------------- training

def train_command(model: str, args, save_dir: str, seed: int, data: str) -> List[str]:
    """Every row's recipe: the same batch of sentence pairs, updates, Adam with
    inverse-sqrt warm-up, weight decay, clipping, dropout; its model and objective."""
    mdlm = model.startswith("mdlm")
    size = recipes.Size(args.layers if mdlm else args.encoder_layers, args.embed_dim,
                        args.heads, cond_dim=args.cond_dim if mdlm else None,
                        max_positions=args.max_positions if mdlm else None,
                        decoder_layers=None if mdlm else args.decoder_layers)
    protocol = ["--batch-size", args.batch_size, "--required-batch-size-multiple", 1,
                *recipes.adam_inverse_sqrt(args.lr, min(args.warmup_updates, args.max_update)),
                "--max-update", args.max_update, "--skip-invalid-size-inputs-valid-test",
                "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "json",
                "--log-interval", max(1, min(100, args.max_update // 4)), "--seed", seed,
                "--num-workers", 0]
    return recipes.train_command(FAMILY[model], data, protocol, size=size, dropout=args.dropout,
                                 device=lm.device(),
                                 model_extra=["--target-canvas", args.target_canvas] if mdlm else [])


def run_dir(model: str, seed: int, args) -> str:
    return os.path.join(args.work_dir, f"{model}_seed{seed}")


def read_train_log(text: str, model: str) -> Dict[str, object]:
    """Sentence pairs and target tokens (with </s>) seen, from fairseq's end-of-epoch
    records (exact: each holds its epoch's mean batch and update count; CMLM's target
    also holds <s>, not counted), the validation curve and the parameter count."""
    pairs = tokens = 0.0
    before = 0
    bos = 1 if model == "cmlm" else 0
    for r in map(recipes.numbers, recipes.json_records(text, "train")):
        n = r["train_num_updates"] - before
        before = r["train_num_updates"]
        pairs += r["train_bsz"] * n
        tokens += (r["train_wpb"] - bos * r["train_bsz"]) * n
    curve = sorted({int(r["valid_num_updates"]): r["valid_loss"] for r in
                    map(recipes.numbers, recipes.json_records(text, "valid"))
                    if "valid_num_updates" in r and "valid_loss" in r}.items())
    return {"pairs_seen": round(pairs), "target_tokens_seen": round(tokens),
            "valid_curve": curve, "params": recipes.logged_params(text)}


def train(model: str, seed: int, args, data: str) -> Dict[str, object]:
    """A row's run, trained once: a finished run with the same recipe is taken as it is;
    an interrupted one resumes from its checkpoint_last.pt."""
    save_dir = run_dir(model, seed, args)
    os.makedirs(save_dir, exist_ok=True)
    done_file = os.path.join(save_dir, "train_done.json")
    cmd = train_command(model, args, save_dir, seed, data)
    if os.path.isfile(done_file):
        done = reporting.read_json(done_file)
        if lm.recipe(done["command"]) == lm.recipe(cmd):
            return done
    print(f"{model} seed {seed}: training {args.max_update} updates", flush=True)
    log = os.path.join(save_dir, "train.log")
    last = os.path.join(save_dir, "checkpoint_last.pt")
    resumed = os.path.isfile(last)
    if resumed and lm.updates_done(last) >= args.max_update:
        timing = {"wall_s": None, "cpu_s": None}       # made by hand; not timed here
    else:
        timing = lm.run(cmd, log, SimpleNamespace(threads=args.threads),
                        f"training {model} seed {seed}")
    if not os.path.isfile(last):
        raise CompareError(f"training {model} wrote no {last}; see {log}")
    with open(log) as f:
        parsed = read_train_log(f.read(), model)
    cpu = None if resumed else timing["cpu_s"]
    result = {"model": model, "seed": seed, "command": cmd, "checkpoint": last,
              "resumed": resumed, **timing, **parsed,
              "tokens_per_cpu_s": parsed["target_tokens_seen"] / cpu if cpu else None}
    write_local(done_file, result)
    return result


def write_local(path: str, record: Dict) -> None:
    """A record of the work directory, read back on this machine: its paths as they are
    (results.json, which may be committed, holds them portable)."""
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def distilled_data(teacher: Dict, args) -> Dict[str, object]:
    """Sequence-level knowledge distillation (Kim & Rush 2016): the training sources
    with the teacher's beam-5 translations (at most --target-canvas tokens with </s>) as
    targets, binarized with the data's dictionary; valid and test are the original
    splits (linked)."""
    root = os.path.join(args.work_dir, "distilled")
    bin_dir, raw = os.path.join(root, "bin"), os.path.join(root, "raw", "train")
    done_file = os.path.join(root, "distill_done.json")
    # at most the student's canvas (with </s>): no distilled pair is too long to train on
    gen = recipes.translate_command(FAMILY["transformer"], args.data, teacher["checkpoint"],
                                    ["--beam", 5, "--max-len-a", 0,
                                     "--max-len-b", args.target_canvas - 1],
                                    split="train", batch_size=args.gen_batch_size,
                                    device=lm.device())
    if os.path.isfile(done_file):
        done = reporting.read_json(done_file)
        if lm.recipe(done["command"]) == lm.recipe(gen) and \
                done["teacher"] == lm.recipe(teacher["command"]):
            return done
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    log = os.path.join(root, "generate_train.log")
    if os.path.exists(log):
        os.remove(log)
    print("distillation: the transformer translates the training split", flush=True)
    lm.run(gen, log, SimpleNamespace(threads=args.threads), "the teacher's translations",
           env=TRUSTED_CHECKPOINTS)
    with open(log) as f:
        text = f.read()
    sources = dict(re.findall(r"^S-(\d+)\t(.*)$", text, re.M))
    targets = {i: h for i, _, h in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", text, re.M)}
    n = split_sizes(args.data, "train", args)["sentences"]
    if len(sources) != n or set(sources) != set(targets):
        raise CompareError(f"the teacher translated {len(targets)} of {n} training pairs; "
                           f"see {log}")
    for lang, lines in ((args.source_lang, sources), (args.target_lang, targets)):
        with open(f"{raw}.{lang}", "w") as f:
            f.write("".join(lines[str(i)] + "\n" for i in range(n)))
    src_dict = os.path.join(args.data, f"dict.{args.source_lang}.txt")
    pre = recipes.tool("fairseq-preprocess") + [
        "--source-lang", args.source_lang, "--target-lang", args.target_lang,
        "--joined-dictionary", "--srcdict", src_dict, "--trainpref", raw,
        "--destdir", bin_dir, "--workers", "1"]
    lm.run(pre, os.path.join(root, "preprocess.log"), SimpleNamespace(threads=args.threads),
           "binarizing the distilled training split")
    pair = f"{args.source_lang}-{args.target_lang}"
    for split in ("valid", "test"):
        for lang in (args.source_lang, args.target_lang):
            for ext in ("bin", "idx"):
                name = f"{split}.{pair}.{lang}.{ext}"
                link = os.path.join(bin_dir, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(args.data, name)), link)
    result = {"command": gen, "preprocess": pre, "teacher": lm.recipe(teacher["command"]),
              "data": bin_dir, "pairs": n,
              "empty_targets": sum(not t.strip() for t in targets.values())}
    write_local(done_file, result)
    return result


# --------------------------------------------------------------------------- decoding

def decoders(model: str, args) -> List[Dict[str, object]]:
    """The decodings of a model: each a row of the table (``row``), a line of the plot
    (``series``), the point's label and fairseq-generate's flags."""
    if model == "transformer":
        return [{"row": f"transformer beam {k}", "series": "transformer greedy" if k == 1
                 else "transformer beam", "label": "greedy" if k == 1 else f"beam {k}",
                 "flags": ["--beam", k], "exact_calls": k == 1} for k in args.beams]
    if model == "cmlm":
        # fairseq's loop makes --iter-decode-max-iter + 1 decoder passes; forced, so that
        # T is the paper's number of iterations for every sentence
        return [{"row": f"cmlm mask-predict T={t}", "series": "cmlm mask-predict",
                 "label": f"T={t}", "exact_calls": True,
                 "flags": ["--iter-decode-max-iter", t - 1, "--iter-decode-force-max-iter",
                           "--print-step", "--beam", 1]} for t in args.cmlm_iterations]
    out = []
    for sampler in args.samplers:
        for steps in ([None] if sampler == "first_hitting" else args.steps):
            out.append({"row": f"{model} {sampler}" + (f" {steps}" if steps else ""),
                        "series": f"{model} {sampler}",
                        "label": f"{steps}" if steps else "1 token/pass",
                        "exact_calls": True, "flags": ["--sampler", sampler, "--temperature", args.temperature]
                        + (["--steps", steps] if steps else [])})
    return out


def bleu_of(hyps: List[str], refs: List[str]) -> Dict[str, object]:
    """sacreBLEU of detokenized hypotheses against the references (fairseq's
    ``--scoring sacrebleu`` configuration: 13a tokenization, case-sensitive)."""
    from sacrebleu.metrics import BLEU
    metric = BLEU()
    score = metric.corpus_score(hyps, [refs])
    return {"bleu": score.score, "signature": str(metric.get_signature()),
            "length_ratio": score.sys_len / score.ref_len if score.ref_len else None}


def read_generate_log(text: str, model: str) -> Dict[str, object]:
    """What fairseq-generate printed: BLEU (recomputed with its signature, and
    fairseq's own line), sentences translated and per second, and network calls per
    sentence: the sequential passes of a network one sentence needs. Transformer: the
    encoder, then one decoder pass per output token and its </s> (beam > 1: of the best
    hypothesis, a lower bound: the search runs until every beam ended). CMLM: the
    encoder (the length comes from it), then T decoder passes. MDLM: the row
    evaluations of the sampler (each the whole [canvas ; source])."""
    refs = dict(re.findall(r"^T-(\d+)\t(.*)$", text, re.M))
    hyps = {i: h for i, _, h in re.findall(r"^D-(\d+)\t(\S+)\t(.*)$", text, re.M)}
    done = re.search(r"Translated ([\d,]+) sentences \([\d,]+ tokens\) in ([\d.]+)s "
                     r"\(([\d.]+) sentences/s", text)
    fairseq_bleu = re.findall(r"BLEU = ([\d.]+)", text)
    if not (hyps and done and fairseq_bleu) or set(hyps) != set(refs):
        return {}
    ids = sorted(hyps, key=int)
    out = {**bleu_of([hyps[i] for i in ids], [refs[i] for i in ids]),
           "fairseq_bleu": float(fairseq_bleu[-1]), "sentences": len(ids),
           "translated": int(done.group(1).replace(",", "")),
           "generate_seconds": float(done.group(2)), "sentences_per_s": float(done.group(3)),
           "example": hyps[ids[0]]}
    if model == "transformer":
        lengths = [len(s.split()) for s in re.findall(r"^P-\d+\t(.*)$", text, re.M)]
        out["calls_per_sentence"] = 1 + statistics.fmean(lengths)
    elif model == "cmlm":
        passes = [int(s) + 1 for s in re.findall(r"^I-\d+\t(\d+)$", text, re.M)]
        out["calls_per_sentence"] = 1 + statistics.fmean(passes)
    else:
        m = re.search(r"mdlm sampling: (\d+) samples, .*?\((\d+) row evaluations\)", text)
        out["calls_per_sentence"] = int(m.group(2)) / int(m.group(1))
    return out


def decode_command(model: str, dec: Dict, train_run: Dict, args) -> List[str]:
    return recipes.translate_command(FAMILY[model], args.data, train_run["checkpoint"],
                                     [*dec["flags"], "--seed", train_run["seed"]],
                                     batch_size=args.gen_batch_size,
                                     post_process=args.post_process, device=lm.device())


def decode(model: str, dec: Dict, train_run: Dict, args, n_test: int) -> Dict:
    """One decoding of one run on the test split, one thread."""
    seed, cmd = train_run["seed"], decode_command(model, dec, train_run, args)
    log = os.path.join(run_dir(model, seed, args),
                       "generate_" + re.sub(r"[^\w.=-]+", "_", dec["row"]) + ".log")
    if os.path.exists(log):
        os.remove(log)
    timing = lm.run(cmd, log, SimpleNamespace(threads=0), f"decoding {dec['row']} seed {seed}",
                    env={**ONE_THREAD, **TRUSTED_CHECKPOINTS})
    with open(log) as f:
        out = read_generate_log(f.read(), model)
    if not out:
        raise CompareError(f"no translations or BLEU in {log}")
    if out["sentences"] != n_test or out["translated"] != n_test:
        raise CompareError(f"{dec['row']} translated {out['sentences']} of the {n_test} test "
                           f"sentences; see {log}")
    return {**out, "command": cmd, "trained_with": lm.recipe(train_run["command"]),
            "calls_exact": dec["exact_calls"], "cpu_s": timing["cpu_s"], "seed": seed}


# --------------------------------------------------------------------------- report

def cell(values: List, spec: str) -> str:
    return lm.mean_sd(values, spec).replace(" (1 seed)", "")


def rows_of(res: Dict) -> List[Dict]:
    """The table's rows, in the command's order, each with its per-seed decodings."""
    out = []
    for dec in res["decoders"]:
        by_seed = [res["decodes"][f"{dec['row']}|{s}"] for s in res["args"]["seeds"]
                   if f"{dec['row']}|{s}" in res["decodes"]]
        out.append({**dec, "by_seed": by_seed})
    return out


def main_table(res: Dict) -> List[str]:
    rows = []
    for r in rows_of(res):
        runs = [res["runs"][r["model"]][str(d["seed"])] for d in r["by_seed"]]
        exact = all(d["calls_exact"] for d in r["by_seed"])
        rows.append([r["row"], len(r["by_seed"]),
                     cell([d["bleu"] for d in r["by_seed"]], ".2f"),
                     cell([d["length_ratio"] for d in r["by_seed"]], ".3f"),
                     ("" if exact else ">= ") +
                     cell([d["calls_per_sentence"] for d in r["by_seed"]], ".1f"),
                     cell([d["sentences_per_s"] for d in r["by_seed"]], ",.1f"),
                     cell([t["tokens_per_cpu_s"] for t in runs], ",.0f"),
                     f"{runs[0]['params'] / 1e6:.2f}M" if runs and runs[0]["params"] else "-"])
    head = ["model, decoding", "seeds", "BLEU (test)", "length ratio",
            "network calls / sentence", "sentences / s (1 thread)",
            "training tokens / CPU-s", "params"]
    signatures = sorted({d["signature"] for r in rows_of(res) for d in r["by_seed"]})
    gap = max((abs(round(d["bleu"], 2) - d["fairseq_bleu"]) for r in rows_of(res)
               for d in r["by_seed"]), default=0.0)
    return [md_table(head, rows, "lrrrrrrr"), "",
            f"sacreBLEU on the {res['data']['test']['sentences']:,} test sentences "
            f"(detokenized: `--post-process {res['args']['post_process'] or 'none'}`), "
            "signature "
            + ", ".join(f"`{s}`" for s in signatures)
            + f"; fairseq-generate's own BLEU line agrees within {gap:.2f}. Cells: mean ± "
            "sd over seeds. Length ratio: hypothesis / reference length (BLEU's brevity "
            "penalty starts below 1).", ""]


def notes() -> List[str]:
    return ["Network calls per sentence: the sequential passes of a network one sentence "
            "needs. transformer: the encoder, then one incremental decoder pass (one new "
            "position, cached keys) per output token and its </s>; beam > 1 evaluates "
            "that many rows per pass and runs until every beam ended, so its count (of "
            "the best hypothesis) is a lower bound (`>=`). cmlm: the encoder (the length "
            "is predicted from it), then T passes of the decoder over the whole target. "
            "mdlm: passes of the one network over the whole [target canvas ; source] "
            "(row evaluations of the sampler, which skips a sentence whose tokens did not "
            "change: ddpm_cache). So a call is far cheaper for the transformer than for "
            "the others; sentences per second (fairseq-generate's timer, one thread, "
            "`--gen-batch-size` sentences a batch) is the cost on this machine.", "",
            "Training tokens per CPU-second: target tokens (with </s>) of the pairs seen, "
            "over the CPU time of the whole fairseq-train run (validation included).", ""]


def training_table(res: Dict) -> List[str]:
    rows = []
    for m in res["models"]:
        t = [res["runs"][m][str(s)] for s in res["args"]["seeds"] if str(s) in res["runs"][m]]
        rows.append([m, len(t), cell([x["pairs_seen"] for x in t], ",.0f"),
                     cell([x["target_tokens_seen"] for x in t], ",.0f"),
                     cell([x["tokens_per_cpu_s"] for x in t], ",.0f"),
                     cell([x["wall_s"] / 60 if x.get("wall_s") else None for x in t], ".1f"),
                     cell([x["valid_curve"][-1][1] if x["valid_curve"] else None for x in t],
                          ".3f")])
    head = ["model", "seeds", "pairs seen", "target tokens seen", "tokens / CPU-s",
            "wall (min)", "last valid loss"]
    return ["## Training", "",
            "Valid loss: each model's own training loss (base 2; not comparable across "
            "models). Wall time and tokens per CPU-second are left out for resumed runs.", "",
            md_table(head, rows, "lrrrrrr"), ""]


def commands_section(res: Dict) -> List[str]:
    """The first seed's fairseq commands: one training per model, one decoding per row."""
    seed = str(res["args"]["seeds"][0])
    cmds = [shlex.join(map(str, res["runs"][m][seed]["command"])) for m in res["models"]
            if seed in res["runs"][m]]
    env = " ".join(f"{k}={v}" for k, v in {**ONE_THREAD, **TRUSTED_CHECKPOINTS}.items())
    cmds += [f"{env} {shlex.join(map(str, d['by_seed'][0]['command']))}" for d in rows_of(res)
             if d["by_seed"]]
    return ["## Commands (first seed)", "", "```bash"] + cmds + ["```", ""]


def report(res: Dict) -> str:
    a, d = res["args"], res["data"]
    out = [f"# Translation: MDLM vs fairseq's transformer and CMLM ({d['pair']})", "",
           f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
           f"Date: {res['date']}, git {res['git']}", "",
           f"Data: `{d['dir']}`, {d['train']['sentences']:,} training pairs, test "
           f"{d['test']['sentences']:,} sentences ({d['test']['target_tokens']:,} target "
           f"tokens with </s>). Every model: {a['max_update']:,} updates of {a['batch_size']} "
           f"sentence pairs, Adam lr {a['lr']}, inverse-sqrt warm-up {a['warmup_updates']}, "
           f"dropout {a['dropout']}, width {a['embed_dim']} (FFN {4 * a['embed_dim']}), "
           f"{a['heads']} heads; transformer and cmlm {a['encoder_layers']} + "
           f"{a['decoder_layers']} layers with shared embeddings and label smoothing 0.1; "
           f"mdlm {a['layers']} layers, a {a['target_canvas']}-position target canvas. "
           f"Last checkpoint; seeds " + " ".join(map(str, a["seeds"]))
           + f"; MDLM samples at temperature {a['temperature']}.", ""]
    if res.get("distillation"):
        k = res["distillation"]
        out += [f"mdlm_kd: trained on the {k['pairs']:,} training sources with the transformer's "
                f"(seed {a['seeds'][0]}) beam-5 translations as targets (`{k['data']}`).", ""]
    out += ["## Test BLEU, cost", ""] + main_table(res) + notes() + [
        "Plot: `bleu_calls.png` (BLEU against network calls per sentence).", ""] \
        + training_table(res) + commands_section(res)
    return "\n".join(out)


def plot(res: Dict, path: str) -> None:
    """BLEU (mean over seeds, sd as error bars) against network calls per sentence, one
    line per model and decoder (reporting's style of the series), each point labelled."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: Dict[str, List] = {}
    for r in rows_of(res):
        if r["by_seed"]:
            b = [d["bleu"] for d in r["by_seed"]]
            series.setdefault(r["series"], []).append((
                statistics.fmean(d["calls_per_sentence"] for d in r["by_seed"]),
                statistics.fmean(b), statistics.stdev(b) if len(b) > 1 else 0.0, r["label"]))
    xs = []
    for name, pts in series.items():
        pts.sort()
        st = reporting.style(name)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker=st.marker, color=st.colour, ms=6, capsize=3, label=name)
        for x, y, _, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6,
                        color=st.colour)
        xs += [p[0] for p in pts]
    reporting.scale(ax, "x", xs)
    ax.set(xlabel="network calls per sentence", ylabel="BLEU (sacreBLEU, test)")
    reporting.legend_outside(ax)
    reporting.save_figure(fig, path, f"{res['data']['pair']}: BLEU vs network calls per "
                          f"sentence ({res['args']['max_update']:,} updates, seeds "
                          + " ".join(map(str, res["args"]["seeds"])) + ")")


def write_report(res: Dict, out: str) -> str:
    text = report(res)
    reporting.write_text(os.path.join(out, "results.md"), text + "\n")
    plot(res, os.path.join(out, "bleu_calls.png"))
    return text


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    path = os.path.join(args.out, "results.json")
    old = reporting.read_json(path) if os.path.isfile(path) else {}
    if args.report_only:
        if not old:
            raise CompareError(f"{path} not found: run the comparison first")
        print(write_report(old, args.out))
        return
    prepare_data(args)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    data = {"dir": args.data, "pair": f"{args.source_lang}-{args.target_lang}",
            **{s: split_sizes(args.data, s, args) for s in ("train", "test")}}
    n_test = data["test"]["sentences"]
    runs = {m: {} for m in args.models}
    decodes = dict(old.get("decodes", {}))     # every decoding ever recorded, by row|seed
    res = {"command": "python " + shlex.join(
               [os.path.relpath(os.path.abspath(__file__))] +
               (sys.argv[1:] if argv is None else list(argv))),
           "machine": reporting.machine_line(reporting.machine(lm.device(), 1)),
           "date": datetime.date.today().isoformat(), "git": reporting.git_revision(),
           "args": vars(args), "data": data, "models": args.models, "runs": runs,
           "decoders": [], "decodes": decodes}

    def save():
        reporting.write_text(path, json.dumps(res, indent=1, default=str))

    for model in args.models:
        model_data = args.data
        if model == "mdlm_kd":
            teacher = runs["transformer"][str(args.seeds[0])]
            res["distillation"] = distilled_data(teacher, args)
            model_data = res["distillation"]["data"]
        for seed in args.seeds:
            runs[model][str(seed)] = train(model, seed, args, model_data)
            save()
        for dec in decoders(model, args):
            res["decoders"].append({"model": model, **{k: v for k, v in dec.items()
                                                       if k not in ("flags", "exact_calls")}})
            for seed in args.seeds:
                key, tr = f"{dec['row']}|{seed}", runs[model][str(seed)]
                got = decodes.get(key)
                if got and got["trained_with"] == lm.recipe(tr["command"]) and \
                        lm.recipe(got["command"]) == lm.recipe(decode_command(model, dec, tr, args)):
                    continue
                print(f"{dec['row']} seed {seed}: decoding the test split", flush=True)
                decodes[key] = decode(model, dec, tr, args, n_test)
                save()
    save()
    print(write_report(res, args.out))
    print(f"written: {args.out}/results.md, results.json, bleu_calls.png")


if __name__ == "__main__":
    main()
