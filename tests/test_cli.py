"""End to end through fairseq's own CLIs on real (tiny) data, and bad input."""
import json
import re
import shutil

import pytest

from conftest import TINY_MODEL, USER_DIR, fairseq_cli, write_ptb_slice


def _json_logs(text, tag):
    out = []
    for line in text.splitlines():
        i = line.find("{")
        if i >= 0 and f"| {tag} |" in line:
            out.append(json.loads(line[i:]))
    return out


def test_training_lowers_the_loss(trained_tiny):
    _, log = trained_tiny
    inner = _json_logs(log, "train_inner")
    assert len(inner) >= 6
    first, last = float(inner[0]["loss"]), float(inner[-1]["loss"])
    assert last < first - 1.0, (first, last)
    valid = _json_logs(log, "valid")
    assert valid and "valid_ppl" in valid[-1]


def _validate(data, ckpt, *extra):
    proc = fairseq_cli("validate", data, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                       "--path", ckpt, "--valid-subset", "test", "--batch-size", "8", "--cpu",
                       *extra)
    line = [l for l in (proc.stdout + proc.stderr).splitlines() if "valid on 'test'" in l][-1]
    return {k: float(v) for k, v in re.findall(r"\| (\w+) ([-\d.]+)", line)}


def test_validate_prints_a_reproducible_bound(ptb_tiny, trained_tiny):
    ckpt = trained_tiny[0] / "checkpoint_best.pt"
    a = _validate(ptb_tiny, ckpt, "--eval-passes", "3")
    b = _validate(ptb_tiny, ckpt, "--eval-passes", "3")
    assert a == b                                     # fixed seed: the same number twice
    assert a["ppl"] == pytest.approx(2 ** a["loss"], rel=1e-3)
    assert 1 < a["ppl"] < len(open(ptb_tiny / "dict.txt").readlines()) * 4
    assert a["bound_se"] > 0 and "ppl_se" in a
    # every token of the split is scored (fairseq's default batching drops a tail)
    from fairseq.data import data_utils
    split = data_utils.load_indexed_dataset(str(ptb_tiny / "test"), None)
    assert a["wpb"] == int(split.sizes.sum())   # (split kept alive: sizes is a view of its mmap)
    c = _validate(ptb_tiny, ckpt, "--eval-passes", "3", "--eval-seed", "7")
    assert c["loss"] != a["loss"]                     # the seed really drives the draws
    assert abs(c["loss"] - a["loss"]) < 6 * a["bound_se"] + 0.05


def test_discrete_time_bound_is_not_below_continuous(ptb_tiny, trained_tiny):
    ckpt = trained_tiny[0] / "checkpoint_best.pt"
    cont = _validate(ptb_tiny, ckpt, "--eval-passes", "4")
    disc = _validate(ptb_tiny, ckpt, "--eval-passes", "4", "--criterion", "mdlm",
                     "--discrete-steps", "4")
    assert disc["loss"] > cont["loss"] - 2 * cont["bound_se"]


def _error_of(proc):
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def _train(data, tmp_path, *extra):
    return fairseq_cli("train", data, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                       "--criterion", "mdlm", "--cpu", "--batch-size", "4", "--max-update", "1",
                       "--save-dir", tmp_path / "ckpt", "--optimizer", "adam", *extra,
                       check=False)


def test_unknown_architecture(ptb_tiny, tmp_path):
    text = _error_of(_train(ptb_tiny, tmp_path, "--arch", "mdlm_huge"))
    assert "invalid choice: 'mdlm_huge'" in text and "mdlm_tiny" in text


def test_add_bos_token_is_refused(ptb_tiny, tmp_path):
    """<s> at the head of every target would be a free token for the bound only
    (fairseq-eval-lm drops it on the AR side): refused, as the task docstring says."""
    text = _error_of(_train(ptb_tiny, tmp_path, "--arch", "mdlm_tiny", "--add-bos-token"))
    assert "mdlm_plugin: error: --add-bos-token is not supported by --task masked_diffusion" \
        in text and "drop the flag" in text


def test_scored_tokens_are_printed_exactly():
    """fairseq prints numbers with 6 significant digits (2.46913e+06); the bound's own
    count of a 2.5M-token split reaches the JSON and text logs digit for digit."""
    from fairseq import metrics
    from fairseq.logging.progress_bar import JsonProgressBar, SimpleProgressBar
    from mdlm_plugin.criterions.bound import DiffusionBoundCriterion
    counts = [1_234_567, 1_234_568, 1]
    outputs = [{"loss": 0.7 * n, "ntokens": n, "nmasked": n // 2, "_pass0": 0.6 * n,
                "_pass1": 0.8 * n} for n in counts]
    with metrics.aggregate(new_root=True) as agg:
        DiffusionBoundCriterion.reduce_metrics(outputs)
        stats = agg.get_smoothed_values()
    assert "{:g}".format(sum(counts)) == "2.46914e+06"          # what fairseq prints for a number
    as_json = json.loads(json.dumps(JsonProgressBar([])._format_stats(stats)))
    assert int(as_json["scored_tokens"]) == sum(counts) == 2_469_136
    assert "scored_tokens 2469136" in SimpleProgressBar([])._str_pipes(
        SimpleProgressBar([])._format_stats(stats))
    assert stats["bound_se"] > 0


def test_unknown_schedule(ptb_tiny, tmp_path):
    text = _error_of(_train(ptb_tiny, tmp_path, "--arch", "mdlm_tiny", "--noise-schedule", "cos"))
    assert "invalid choice: 'cos'" in text and "loglinear" in text


def test_data_dir_without_dict(tmp_path):
    text = _error_of(_train(tmp_path, tmp_path, "--arch", "mdlm_tiny"))
    assert "mdlm_plugin: error: no dict.txt in" in text and "fairseq-preprocess" in text


def test_tokens_per_sample_beyond_positions(ptb_tiny, tmp_path):
    text = _error_of(_train(ptb_tiny, tmp_path, "--arch", "mdlm_tiny",
                            "--tokens-per-sample", "1000"))
    assert "--tokens-per-sample 1000 exceeds the model's 512 positions" in text


def test_checkpoint_with_another_dictionary(trained_tiny, tmp_path):
    other = tmp_path / "other"
    raw = write_ptb_slice(tmp_path / "raw", lines=(300, 50, 50), offset=5000)
    fairseq_cli("preprocess", "--only-source", "--trainpref", raw / "train.txt",
                "--validpref", raw / "valid.txt", "--testpref", raw / "test.txt",
                "--destdir", other, "--workers", "1")
    proc = fairseq_cli("validate", other, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                       "--path", trained_tiny[0] / "checkpoint_best.pt", "--valid-subset",
                       "test", "--batch-size", "8", "--cpu", check=False)
    text = _error_of(proc)
    assert "trained with a different dictionary" in text


def test_resume_continues_from_last_checkpoint(ptb_tiny, tmp_path):
    common = ["--arch", "mdlm_tiny", *TINY_MODEL[2:], "--batch-size", "8", "--lr", "1e-3",
              "--store-ema", "--ema-decay", "0.9",
              "--log-format", "json", "--log-interval", "5", "--seed", "5",
              "--no-epoch-checkpoints", "--num-workers", "0"]
    first = _train(ptb_tiny, tmp_path, *common[:], "--max-update", "10")
    assert first.returncode == 0, first.stderr[-2000:]
    again = _train(ptb_tiny, tmp_path, *common, "--max-update", "15")
    assert again.returncode == 0, again.stderr[-2000:]
    text = again.stdout + again.stderr
    assert "Loaded checkpoint" in text and "@ 10 updates" in text
    assert _json_logs(text, "train_inner")[0]["num_updates"] == "15"


def test_hydra_recipe_runs(ptb_tiny, tmp_path):
    """examples/ptb/config/mdlm_tiny.yaml works with fairseq-hydra-train."""
    from conftest import REPO
    proc = fairseq_cli(
        "hydra_train", "--config-dir", REPO / "examples/ptb/config", "--config-name",
        "mdlm_tiny", f"task.data={ptb_tiny}", f"common.user_dir={USER_DIR}",
        "optimization.max_update=2", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "task.tokens_per_sample=32", "dataset.batch_size=4", "dataset.disable_validation=true",
        f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert "num_updates 2" in text and (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
    # the recipe trains mdlm_tiny's 4 x 256, as train_mdlm.sh does (not the dataclass
    # defaults hydra would otherwise fill in)
    import torch
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=False)
    model = state["cfg"]["model"]
    assert (model["embed_dim"], model["layers"], model["attention_heads"]) == (256, 4, 4)
    assert sum(v.numel() for k, v in state["model"].items() if ".blocks.4." in k) == 0


def _corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_data_stops_before_training(ptb_tiny, tmp_path):
    bad = _corrupt_copy(ptb_tiny, tmp_path / "bad")
    with open(bad / "train.bin", "r+b") as f:
        f.truncate((bad / "train.bin").stat().st_size - 64)
    text = _error_of(_train(bad, tmp_path, *TINY_MODEL))
    assert "train.bin has" in text and "truncated" in text
    assert "num_updates" not in text and "begin training" not in text


def test_index_of_other_data(ptb_tiny, trained_tiny, tmp_path):
    bad = _corrupt_copy(ptb_tiny, tmp_path / "bad")
    shutil.copy(bad / "valid.idx", bad / "test.idx")
    proc = fairseq_cli("validate", bad, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                       "--path", trained_tiny[0] / "checkpoint_best.pt", "--valid-subset",
                       "test", "--batch-size", "8", "--cpu", check=False)
    assert "the .idx was written for other data" in _error_of(proc)
