"""Long runs (examples/compare/long_runs.py) on a tiny budget: evaluation points recorded
as they finish and never recomputed, an interrupted row resumed, a finished row extended,
early stopping on a constructed plateau (which needs fairseq's --patience counter to
survive a resume: mdlm_plugin.checkpoint_io), the report and curves from results.json."""
import json
import os
import sys

import pytest

from conftest import USER_DIR

sys.path.insert(0, os.path.join(os.path.dirname(USER_DIR), "examples", "compare"))
import compare  # noqa: E402
import long_runs  # noqa: E402

TINY = ["--layers", "2", "--embed-dim", "64", "--heads", "2", "--cond-dim", "32",
        "--tokens-per-sample", "32", "--batch-size", "8", "--warmup-updates", "2",
        "--validate-interval-updates", "2", "--eval-passes", "2", "--valid-passes", "2",
        "--log-interval", "2", "--threads", "1"]


@pytest.fixture
def scored(monkeypatch):
    """Every test-split evaluation long_runs makes, as (row directory, tag)."""
    calls = []
    real = compare.evaluate

    def counting(model, ckpt, data_dir, args, tag):
        calls.append((os.path.basename(os.path.dirname(ckpt)), tag))
        return real(model, ckpt, data_dir, args, tag)
    monkeypatch.setattr(compare, "evaluate", counting)
    return calls


def invoke(data, tmp_path, *extra):
    argv = ["--name", "tiny", "--data", str(data), "--work-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), *TINY, *extra]
    long_runs.main(argv)
    with open(tmp_path / "out" / "results.json") as f:
        return json.load(f)


def test_points_resume_extend_and_report(ptb_tiny, tmp_path, scored):
    rows = ["--rows", "mdlm@0", "mdlm_ar@0.1", "--eval-every", "4"]
    res = invoke(ptb_tiny, tmp_path, *rows, "--max-update", "4", "--jobs", "2")
    assert set(res["rows"]) == {"mdlm@0", "mdlm_ar@0.1"}
    for rec in res["rows"].values():
        assert list(rec["points"]) == ["4"] and rec["trained_to"] == 4
        assert rec.get("stopped_early_at") is None and rec["best"]["update"] in (2, 4)
    ar = res["rows"]["mdlm_ar@0.1"]["points"]["4"]["test"]
    assert ar["tokens"] == res["rows"]["mdlm@0"]["points"]["4"]["test"]["tokens"] > 0
    assert ar["eval_lm_ppl"] > 0 and not res["rows"]["mdlm_ar@0.1"]["bound"]
    assert {("mdlm_ar_d0.1", "test_4"), ("mdlm_d0", "test_4")} <= set(scored)

    # an interrupted segment: the mdlm row got to update 6 and was killed there; the next
    # invocation (a larger budget) resumes it from update 6, and no recorded point is
    # scored again
    args = long_runs.parse_args(["--name", "tiny", "--data", str(ptb_tiny), "--work-dir",
                                 str(tmp_path / "runs"), "--rows", "mdlm@0", *TINY,
                                 "--eval-every", "4", "--max-update", "8"])
    row = long_runs.parse_row("mdlm@0")
    log = os.path.join(long_runs.row_dir(row, args), "train.log")
    compare.run(long_runs.segment_command(row, args, 6), log, args, "the segment to 6")
    done = set(scored)
    res = invoke(ptb_tiny, tmp_path, *rows, "--max-update", "8")
    new = scored[len(done):]
    assert res["rows"]["mdlm@0"]["train"]["segments"] == 2   # 4 -> (6, by hand) -> 8
    assert {("mdlm_ar_d0.1", "test_8"), ("mdlm_d0", "test_8")} <= set(new)
    assert not set(new) & done and len(new) == len(set(new))
    mdlm = res["rows"]["mdlm@0"]
    assert sorted(mdlm["points"], key=int) == ["4", "8"] and mdlm["trained_to"] == 8
    assert all(p["date"] and p["git"] for p in mdlm["points"].values())   # provenance
    with open(log) as f:
        text = f.read()
    assert "@ 4 updates" in text and "@ 6 updates" in text      # resumed at 4, then at 6
    assert [u for u, _ in mdlm["valid_curve"]] == [2, 4, 6, 8]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| mdlm@0 |" in md and "| mdlm_ar@0.1 |" in md and "budget reached" in md
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    assert "--work-dir" not in res["command"] and res["args"]["max_update"] == 8

    # a block-diffusion row fine-tuned from the MDLM row's best checkpoint, with a clipped
    # mask rate; a row whose source has not been trained is refused
    res = invoke(ptb_tiny, tmp_path, "--rows", "bd3_4@0~mdlm@0", "--eval-every", "4",
                 "--max-update", "4")
    ft = res["rows"]["bd3_4@0~mdlm@0"]
    assert ft["identity"][ft["identity"].index("--finetune-from-model") + 1] == \
        "mdlm_d0/checkpoint_best.pt" and "--train-mask-rate" in ft["identity"]
    assert list(ft["points"]) == ["4"] and ft["bound"]
    with open(tmp_path / "runs" / "bd3_4_d0_from_mdlm_d0" / "train.log") as f:
        assert "loading pretrained model from" in f.read()
    with pytest.raises(SystemExit, match="mdlm@0.5 has no best checkpoint"):
        invoke(ptb_tiny, tmp_path, "--rows", "bd3_4@0~mdlm@0.5", "--max-update", "4")

    check_samples(ptb_tiny, tmp_path)

    # the same name with another recipe is refused, not mixed into the record
    with pytest.raises(SystemExit, match="another recipe"):
        invoke(ptb_tiny, tmp_path, *rows, "--max-update", "8", "--lr", "0.002")


def check_samples(data, tmp_path):
    """--sample-only: every row's sets from its best checkpoint under the chosen AR row's
    judge, recorded with the checkpoint's update; a second invocation draws only the set
    it lacks; options reach the sampler; a bad set is refused before anything runs."""
    drawn = []
    real = long_runs.draw

    def counting(sset, loaded, args):
        drawn.append(sset["label"])
        return real(sset, loaded, args)
    sets = ["ddpm_cache:4", "remdm:4:remdm_loop=true,top_p=0.9"]
    rows = ["--rows", "mdlm@0", "mdlm_ar@0.1", "bd3_4@0~mdlm@0", "--max-update", "8",
            "--sample-only", "--samples", "3", "--sample-batch", "2"]
    mp = pytest.MonkeyPatch()
    mp.setattr(long_runs, "draw", counting)
    try:
        res = invoke(data, tmp_path, *rows, "--sample-sets", *sets)
        assert sorted(drawn) == sorted(["ancestral:32"] + 2 * sets)
        sp = res["sampling"]
        assert sp["judge"] == "mdlm_ar@0.1" and sp["samples"] == 3 and sp["length"] == 32
        for name, rec in res["rows"].items():
            smp = rec["samples"]
            assert smp["update"] == rec["best"]["update"] and smp["finished"]
            assert set(smp["sets"]) == ({"ancestral:32"} if name == "mdlm_ar@0.1" else set(sets))
            for e in smp["sets"].values():
                assert e["gen_ppl"]["mdlm_ar@0.1"] > 1 and 0 < e["entropy"]
                assert 0 <= e["repetition"] <= 1 and e["calls_per_sample"] > 0
        # ddpm_cache never spends more row evaluations than its steps (and 32 tokens)
        assert res["rows"]["mdlm@0"]["samples"]["sets"]["ddpm_cache:4"][
            "calls_per_sample"] <= 4
        md = (tmp_path / "out" / "results.md").read_text()
        assert "## Samples from the best validation checkpoints" in md
        assert "| mdlm@0 (update " in md and "remdm:4:remdm_loop=true,top_p=0.9" in md
        assert (tmp_path / "out" / "samples.png").stat().st_size > 10_000
        assert any("--sample-only" in c for c in res["commands"]) and len(res["commands"]) > 1
        before = len(drawn)
        invoke(data, tmp_path, *rows, "--sample-sets", *sets, "confidence:4")
        assert drawn[before:] == ["confidence:4", "confidence:4"]   # mdlm@0 and bd3_4
    finally:
        mp.undo()
    for bad in ("ddpm:0", "nosuch:4", "remdm:4:eta", "ddpm:4:top_p=2"):
        with pytest.raises(SystemExit):
            long_runs.parse_args(["--name", "x", "--rows", "mdlm@0", "--sample-sets", bad])
    with pytest.raises(ValueError, match="not sampler flags"):
        long_runs.draw(long_runs.parse_sample_set("ddpm:4:no_such_flag=1"),
                       load_tiny(data, tmp_path), long_runs.parse_args(
                           ["--name", "x", "--rows", "mdlm@0", *TINY]))


def load_tiny(data, tmp_path):
    from mdlm_plugin.generative_eval import load_checkpoint
    return load_checkpoint(str(tmp_path / "runs" / "mdlm_d0" / "checkpoint_best.pt"), str(data),
                           {"tokens_per_sample": 32})


def test_early_stop_on_a_plateau_survives_segments(ptb_tiny, tmp_path, scored):
    """With lr 0 the weights never change and the validation bound (fixed evaluation
    seed) is the same number every time: validations at 2 (the best), 4, 6 make two
    without improvement, so --patience 2 stops at update 6, across the segment boundary at
    update 4. Without the counter in the checkpoint the second segment would count anew
    and the row would never stop."""
    res = invoke(ptb_tiny, tmp_path, "--rows", "mdlm@0", "--eval-every", "4", "--lr", "0",
                 "--patience", "2", "--max-update", "20")
    rec = res["rows"]["mdlm@0"]
    assert rec["stopped_early_at"] == 6 and rec["trained_to"] == 6
    assert rec["train"]["segments"] == 2
    vals = [v for _, v in rec["valid_curve"]]
    assert len(vals) == 3 and len(set(vals)) == 1
    # fairseq's checkpoint_best.pt takes the latest of equal validations (a <= b)
    assert sorted(rec["points"], key=int) == ["4", "6"] and rec["best"]["update"] == 6
    assert "early stop at 6" in (tmp_path / "out" / "results.md").read_text()
