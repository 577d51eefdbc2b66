"""One recipe for every fairseq command line (mdlm_plugin/recipes.py).

tests/recorded_commands.json holds the command lines of the comparison and of the
benchmarks byte for byte as the code before the recipe refactor (issue 9) wrote them
(its compare_eval entries are the commands recorded by the committed
examples/compare/results/ptb_samplers/results.json). The refactored scripts must give the
same bytes, so the refactor changes no measurement, except for these deliberate changes:

- compare.py reads fairseq's JSON logs: ``--log-format json`` instead of ``simple`` for
  fairseq-train, and ``--log-format json`` appended to fairseq-validate (the log format
  changes what fairseq prints, not what it computes);
- gpu_mfu.py: the same flags and values in the recipe's order (no committed result).

The sizes of the architectures, the CPU recipe, the hydra recipe and the tests' tiny
model are checked against each other here too.
"""
import argparse
import importlib.util
import json
import os
import re
import shlex
import sys
import tempfile

import pytest
import yaml

from conftest import REPO, TINY_MODEL, TINY_SIZE
from mdlm_plugin import recipes, reporting
from mdlm_plugin.models import mdlm as mdlm_models

RECORDED = json.loads((REPO / "tests" / "recorded_commands.json").read_text())
SAME_FLAGS_NEW_ORDER = ("gpu_mfu",)


def _script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _normalise(cmd):
    out = []
    for token in map(str, cmd):
        token = token.replace(os.path.dirname(sys.executable), "<bin>")
        token = token.replace(str(REPO / "mdlm_plugin"), "<plugin>").replace(str(REPO), "<repo>")
        token = token.replace(tempfile.gettempdir(), "<tmp>")
        out.append(token)
    return out


def _compare_commands(out):
    compare = _script(REPO / "examples" / "compare" / "compare.py")
    tiny = ["--max-update", "4", "--batch-size", "8", "--tokens-per-sample", "32", "--layers",
            "1", "--embed-dim", "32", "--heads", "2", "--cond-dim", "16", "--warmup-updates",
            "2", "--validate-interval-updates", "2", "--extra-train-args", "--fp16 --foo 1"]
    for tag, argv in (("compare", []), ("compare_tiny", tiny)):
        a = compare.parse_args(argv)
        for m in compare.MODELS:
            out[f"{tag}/{m}"] = compare.train_command(m, a, "SAVE")
    for m in compare.MODELS:
        out[f"compare_eval/{m}"] = recipes.eval_command(
            m, "data-bin/ptb", f"checkpoints/compare_ptb/{m}/checkpoint_last.pt",
            batch_size=32, tokens_per_sample=128, eval_passes=4, device="cpu")


def _benchmark_commands(out):
    tt = _script(REPO / "benchmarks" / "train_throughput.py")
    for tag, argv, device in (("train_throughput", [], "cpu"),
                              ("train_throughput_amp", ["--amp", "--updates", "40",
                                                        "--dropout", "0"], "cuda")):
        a = tt.parse_args(argv)
        for m in tt.MODELS:
            out[f"{tag}/{m}"] = tt.train_command(m, a, "DATA", device, "SAVE")
    ss = _script(REPO / "benchmarks" / "sampling_speed.py")
    a = ss.parse_args([])
    for m in ("mdlm_tiny", "mdlm_ar_tiny", "transformer_lm"):
        out[f"sampling_speed/{m}"] = ss.train_command(m, a, "DATA", "SAVE")
    gm = _script(REPO / "benchmarks" / "gpu_mfu.py")
    for tag, argv in (("gpu_mfu", []), ("gpu_mfu_smoke", ["--smoke"]),
                      ("gpu_mfu_amp", ["--precision", "amp"])):
        a = gm.parse_args(argv)
        for m in ("mdlm", "transformer_lm"):
            out[f"{tag}/{m}"] = gm.train_command(m, a, "DATA", "cpu" if "smoke" in tag else "cuda")
    dc = _script(REPO / "benchmarks" / "distributed_cpu.py")
    for name, (cmd, env) in dc.commands(dc.parse_args(["DATA"]), 2).items():
        out[f"distributed_cpu/{name}"] = [f"{k}={v}" for k, v in env.items()] + cmd


def _built():
    out = {}
    _compare_commands(out)
    _benchmark_commands(out)
    return {k: _normalise(v) for k, v in out.items()}


BUILT = _built()


def _expected(key):
    cmd = list(RECORDED[key])
    if key.startswith("compare/") or key.startswith("compare_tiny/"):
        cmd[cmd.index("--log-format") + 1] = "json"
    if key == "compare_eval/mdlm":
        cmd += ["--log-format", "json"]
    return cmd


def _flag_pairs(cmd):
    """The command as (executable and data, sorted flag/value tokens)."""
    first = next(i for i, t in enumerate(cmd) if t.startswith("--") and t != "--fairseq-train-bf16")
    groups, current = [], []
    for t in cmd[first:]:
        if t.startswith("--") and current:
            groups.append(tuple(current))
            current = []
        current.append(t)
    return cmd[:first], sorted(groups + [tuple(current)])


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_command_lines_are_those_recorded(key):
    if key.split("/")[0].startswith(SAME_FLAGS_NEW_ORDER):
        assert _flag_pairs(BUILT[key]) == _flag_pairs(_expected(key))
    else:
        assert BUILT[key] == _expected(key)


def _arch_defaults(arch_fn):
    ns = argparse.Namespace()
    arch_fn(ns)
    return recipes.Size(ns.layers, ns.embed_dim, ns.attention_heads, cond_dim=ns.cond_dim,
                        max_positions=ns.max_positions)


def test_sizes_agree_with_the_architectures_and_the_recipes():
    for scale, size in recipes.ARCH_SIZES.items():
        assert _arch_defaults(getattr(mdlm_models, f"mdlm_{scale}")) == size, scale
    cfg = yaml.safe_load((REPO / "examples" / "ptb" / "config" / "mdlm_tiny.yaml").read_text())
    m = cfg["model"]
    assert m["_name"] == "mdlm_tiny"
    assert recipes.Size(m["layers"], m["embed_dim"], m["attention_heads"], m["cond_dim"],
                        m["max_positions"]) == recipes.ARCH_SIZES["tiny"]
    # the CPU recipe (train_mdlm.sh) trains what the hydra recipe trains
    text = (REPO / "examples" / "ptb" / "train_mdlm.sh").read_text()
    call = text[text.index("fairseq-train "):text.index('"${DEVICE_FLAGS[@]}"')]
    call = call.replace("\\\n", " ").replace('"${MAX_UPDATE:-600}"', "600")
    tokens = shlex.split(call)[2:]
    sh = {t[2:].replace("-", "_"): (tokens[i + 1] if i + 1 < len(tokens)
                                    and not tokens[i + 1].startswith("--") else True)
          for i, t in enumerate(tokens) if t.startswith("--")}
    flat = {k: v for section in cfg.values() if isinstance(section, dict)
            for k, v in section.items()}
    for key in ("tokens_per_sample", "batch_size", "weight_decay", "clip_norm",
                "warmup_updates", "max_update", "save_interval_updates",
                "keep_interval_updates", "validate_interval_updates", "eval_passes", "seed",
                "log_interval", "log_format", "sample_break_mode"):
        assert str(flat[key]) == sh[key], key
    assert float(sh["lr"]) == flat["lr"][0] and sh["arch"] == m["_name"]
    assert re.sub(r"\s", "", sh["adam_betas"]) == re.sub(r"\s", "", flat["adam_betas"])
    # the tests' tiny model is the recipe's flags for its size
    assert TINY_MODEL[2:-2] == recipes.size_flags("mdlm", TINY_SIZE)


def test_json_log_records_and_a_report_table():
    log = ('2026-01-01 | INFO | train_inner | {"epoch": 1, "wps": "3517.2", "loss": "9.1"}\n'
           '2026-01-01 | INFO | valid | {"valid_ppl": "551.3", "valid_num_updates": "100"}\n'
           "epoch 001 | loss 9.0 | wps 3000\n")
    assert [recipes.numbers(r) for r in recipes.json_records(log, "train_inner")] == [
        {"epoch": 1.0, "wps": 3517.2, "loss": 9.1}]
    assert recipes.numbers(recipes.json_records(log, "valid")[0])["valid_ppl"] == 551.3
    table = reporting.md_table(["model", "tokens/s"], [["mdlm", reporting.fmt(3517.2, ",.0f")],
                                                       ["ar", reporting.fmt(None)]], align="lr")
    assert table == ("| model | tokens/s |\n|---|---:|\n| mdlm | 3,517 |\n| ar | n/a |")
    m = reporting.machine("cpu", threads=2)
    assert m["torch_threads"] == 2 and m["cpu_cores"] == os.cpu_count() and m["cpu"]
    assert m["git"] != "unknown" and m["fairseq"].startswith("0.12")
    line = reporting.machine_line(m)
    assert f"{m['cpu_cores']} cores, CPU only" in line and m["git"] in line
    assert reporting.machine_table(m, ["cpu", "gpu"]).splitlines() == [
        "| | |", "|---|---|", f"| cpu | {m['cpu']} |"]
