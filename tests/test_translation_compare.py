"""examples/translation/compare.py end to end on a tiny copy task: the transformer, CMLM
and MDLM trained by fairseq-train on the same pairs for a handful of updates, decoded by
fairseq-generate, the report and the plot written; a rerun recomputes nothing, and
--distill adds only its own runs; data that is not bilingual is one clear error."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, preprocess, write_copy

SCRIPT = REPO / "examples" / "translation" / "compare.py"
# 192 training pairs: 6 full batches of 32 an epoch, so 8 updates see 256 pairs
TINY = ["--max-update", "8", "--batch-size", "32", "--warmup-updates", "4",
        "--embed-dim", "32", "--heads", "2", "--layers", "1", "--cond-dim", "16",
        "--target-canvas", "10", "--max-positions", "24", "--encoder-layers", "1",
        "--decoder-layers", "1", "--beams", "1", "--cmlm-iterations", "2",
        "--samplers", "confidence", "--steps", "3", "--gen-batch-size", "8", "--threads", "2"]
N_TEST = 12


def compare(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def commands_run(stdout):
    return re.findall(r"^  \$ (.*)$", stdout, re.M)


@pytest.fixture(scope="module")
def copy_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    raw = write_copy(root / "raw", splits=(("train", 192), ("valid", 8), ("test", N_TEST)))
    return preprocess(raw, root / "bin", "--source-lang", "src", "--target-lang", "tgt",
                      "--joined-dictionary")


@pytest.fixture(scope="module")
def compared(copy_pairs, tmp_path_factory):
    """The comparison run once: (its flags, out dir, work dir)."""
    root = tmp_path_factory.mktemp("compare")
    cmd = ["--data", copy_pairs, "--work-dir", root / "work", "--out", root / "out", *TINY]
    compare(*cmd)
    return cmd, root / "out", root / "work"


ROWS = ["transformer beam 1", "cmlm mask-predict T=2", "mdlm confidence 3"]


def test_every_model_trained_alike_decoded_and_reported(compared):
    _, out, _ = compared
    res = json.loads((out / "results.json").read_text())
    assert res["models"] == ["transformer", "cmlm", "mdlm"]
    assert [d["row"] for d in res["decoders"]] == ROWS
    # the same budget: every model saw the same 8 batches of 32 pairs, the same targets
    runs = [res["runs"][m]["1"] for m in res["models"]]
    assert {r["pairs_seen"] for r in runs} == {8 * 32}
    assert len({r["target_tokens_seen"] for r in runs}) == 1
    assert all(r["params"] > 0 and r["tokens_per_cpu_s"] > 0 for r in runs)
    for row in ROWS:
        d = res["decodes"][f"{row}|1"]
        assert d["sentences"] == d["translated"] == N_TEST      # every test sentence
        assert 0 <= d["bleu"] <= 100 and abs(round(d["bleu"], 2) - d["fairseq_bleu"]) <= 0.01
        assert d["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
        assert d["sentences_per_s"] > 0
    calls = {row: res["decodes"][f"{row}|1"]["calls_per_sentence"] for row in ROWS}
    assert calls["cmlm mask-predict T=2"] == 3            # the encoder, then T passes
    assert 1 <= calls["mdlm confidence 3"] <= 3           # at most one pass a step
    assert calls["transformer beam 1"] >= 2               # the encoder, a token and </s>
    md = (out / "results.md").read_text()
    for row in ROWS:
        assert re.search(rf"^\| {re.escape(row)} \| 1 \| \d+\.\d\d \|", md, re.M), row
    assert "signature `nrefs:1|case:mixed" in md and "--iter-decode-max-iter 1" in md
    assert (out / "bleu_calls.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_recomputes_nothing(compared):
    cmd, out, work = compared
    before = json.loads((out / "results.json").read_text())
    checkpoints = {p: p.stat().st_mtime_ns for p in work.glob("*/checkpoint_last.pt")}
    assert len(checkpoints) == 3
    again = compare(*cmd)
    assert commands_run(again.stdout) == []
    after = json.loads((out / "results.json").read_text())
    assert after["runs"] == before["runs"] and after["decodes"] == before["decodes"]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints


def test_distillation_adds_only_its_own_runs(compared):
    """--distill: the teacher's translations of the training split, their binarization,
    mdlm_kd's training and decoding; nothing else again."""
    cmd, out, work = compared
    ran = commands_run(compare(*cmd, "--distill").stdout)
    assert [os.path.basename(c.split()[0]) for c in ran] == [
        "fairseq-generate", "fairseq-preprocess", "fairseq-train", "fairseq-generate"], ran
    assert "--gen-subset train" in ran[0] and "mdlm_kd_seed1" in ran[2]
    assert f"train {work / 'distilled' / 'bin'} " in ran[2] + " "
    res = json.loads((out / "results.json").read_text())
    assert res["models"][-1] == "mdlm_kd" and res["distillation"]["pairs"] == 192
    teacher = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$",
                              (work / "distilled" / "generate_train.log").read_text(), re.M))
    targets = (work / "distilled" / "raw" / "train.tgt").read_text().splitlines()
    assert targets == [teacher[str(i)] for i in range(192)]
    assert max(len(t.split()) for t in targets) < 10       # within the student's canvas
    assert res["decodes"]["mdlm_kd confidence 3|1"]["sentences"] == N_TEST
    assert "| mdlm_kd confidence 3 | 1 |" in (out / "results.md").read_text()


def _script():
    spec = importlib.util.spec_from_file_location("translation_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_that_is_not_bilingual_is_one_clear_error(copy_pairs, tmp_path):
    mono = tmp_path / "mono"
    mono.mkdir()
    (mono / "dict.txt").write_text((copy_pairs / "dict.src.txt").read_text())
    proc = compare("--data", mono, "--work-dir", tmp_path / "w", "--out", tmp_path / "o",
                   check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    # one line (after fairseq's import-time INFO chatter), naming what is wrong and the fix
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("INFO:")]
    assert len(errors) == 1, proc.stderr
    assert re.fullmatch(r"compare: error: \S+mono holds no bilingual training data \(its "
                        r"dict.txt is monolingual data, fairseq-preprocess --only-source\); "
                        r"a bilingual data directory is .*examples/bible/prepare.sh DIR "
                        r"writes one", errors[0]), proc.stderr
    assert not (tmp_path / "o").exists()

    script = _script()

    def linked(name, leave_out):
        d = tmp_path / name
        d.mkdir()
        for f in copy_pairs.iterdir():
            if not leave_out(f.name):
                (d / f.name).symlink_to(f)
        return str(d)
    with pytest.raises(SystemExit, match=r"lacks test.src-tgt.src.bin, test.src-tgt.src.idx, "
                                         r"test.src-tgt.tgt.bin, test.src-tgt.tgt.idx;"):
        script.language_pair(linked("lacking", lambda n: n.startswith("test.")), None, None)
    split = linked("split", lambda n: n == "dict.tgt.txt")
    (tmp_path / "split" / "dict.tgt.txt").write_text("x 1\n")
    with pytest.raises(SystemExit, match="dict.src.txt and dict.tgt.txt differ"):
        script.language_pair(split, None, None)
    assert script.language_pair(str(copy_pairs), None, None) == ("src", "tgt")
