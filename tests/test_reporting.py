"""What every report shares (mdlm_plugin/reporting.py): one plot style per row name, and
committed results that name no directory of the machine they ran on."""
import json
import os
import re
import sys
import tempfile

import pytest

from conftest import REPO
from mdlm_plugin import recipes, reporting

# the largest comparison: every row compare.py can train (its variants, SEDD, block sizes)
# and every MODEL@DROPOUT row of the long runs, at the dropouts they use
BASE_ROWS = [*recipes.VARIANTS, "bd3_4", "bd3_8", "bd3_16"]
ROWS = BASE_ROWS + [f"{m}@{d}" for m in BASE_ROWS for d in ("0.1", "0.3")]
MACHINE_PATH = re.compile(r'"/(work|root|tmp|home)/|[ (`\'=]/(work|root|tmp|home)/[A-Za-z]')


def test_every_row_of_the_largest_comparison_has_its_own_colour_and_marker():
    assert {"mdlm", "mdlm_ar", "transformer_lm", "sedd", "mdlm_discrete", "mdlm_iid",
            "mdlm_timecond"} <= set(recipes.VARIANTS)
    styles = {row: reporting.style(row) for row in ROWS}
    assert len(set(styles.values())) == len(ROWS), "two rows look alike"
    assert all(reporting.style(m) in reporting.STYLES.values() for m in BASE_ROWS)
    # models differ by colour alone; a dropout variant keeps its model's colour
    assert len({styles[m].colour for m in BASE_ROWS}) == len(BASE_ROWS)
    assert styles["mdlm_ar@0.3"].colour == styles["mdlm_ar"].colour
    assert len({styles["bd3_4"], styles["bd3_4@0.1"], styles["bd3_4@0.3"]}) == 3
    # the colour-only table the long runs read agrees with the styles
    assert all(reporting.COLOURS[m] == styles[m].colour for m in BASE_ROWS)


def test_translation_series_have_their_own_styles():
    """examples/translation/compare.py's plot lines: the model's colour, the decoder's
    marker, none alike and none a row of the LM comparison's."""
    from mdlm_plugin.diffusion.samplers import SAMPLERS
    series = ["transformer greedy", "transformer beam", "cmlm mask-predict"] + [
        f"{m} {s}" for m in ("mdlm", "mdlm_kd") for s in SAMPLERS]
    styles = [reporting.style(x) for x in series]
    assert len(set(styles)) == len(series) and reporting.UNKNOWN not in styles
    assert not set(styles) & set(reporting.STYLES.values())
    assert reporting.style("mdlm confidence").colour == reporting.style("mdlm ddpm").colour
    assert reporting.style("test data") == reporting.STYLES["test data"]


def test_every_committed_comparison_row_is_in_the_style_table():
    for name in ("ptb", "ptb_samplers", "sotu"):
        res = reporting.read_json(REPO / "examples" / "compare" / "results" / name
                                  / "results.json")
        assert set(res["models"]) <= set(reporting.STYLES), name


def test_portable_paths():
    repo, tmp = reporting.REPO, tempfile.gettempdir()
    bin_dir = os.path.dirname(sys.executable)
    p = reporting.portable_path
    assert p(os.path.join(bin_dir, "fairseq-train")) == "fairseq-train"
    assert p(os.path.join(repo, "data-bin", "ptb")) == os.path.join("data-bin", "ptb")
    assert p(os.path.join(tmp, "mdlm-bench-x", "ckpt.pt")) == "$TMPDIR/mdlm-bench-x/ckpt.pt"
    outside = os.path.join(os.path.dirname(repo), "runs", "mdlm")
    assert p(outside) == ("$TMPDIR" + outside[len(tmp):]           # a clone in the tmp dir
                          if outside.startswith(tmp + os.sep) else os.path.relpath(outside, repo))
    assert p("/dev/null") == "/dev/null" and p("data-bin/ptb") == "data-bin/ptb"
    text = (f"{bin_dir}/python {repo}/benchmarks/x.py --save-dir '{tmp}/a' 1/t tokens/s "
            "MDLM/AR (1 - a) / b")
    assert reporting.portable(text) == ("python benchmarks/x.py --save-dir '$TMPDIR/a' "
                                        "1/t tokens/s MDLM/AR (1 - a) / b")
    for path in (os.path.join(tmp, "x", "c.pt"), os.path.join(repo, "checkpoints", "c.pt")):
        assert reporting.local_path(p(path)) == path        # and back, on this machine
    nested = {"cmd": [f"{repo}/mdlm_plugin", 3], "t": (f"{tmp}/b",)}
    assert reporting.portable(nested) == {"cmd": ["mdlm_plugin", 3], "t": ("$TMPDIR/b",)}


def _compare():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "compare_for_reuse", REPO / "examples" / "compare" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    return compare


def test_a_recorded_run_is_reused_from_its_portable_command():
    compare = _compare()
    args = compare.parse_args(["--data", str(REPO / "data-bin" / "ptb")])
    cmd = compare.train_command("mdlm", args, "/somewhere/mdlm")
    recorded = json.loads(json.dumps(reporting.portable([str(t) for t in cmd])))
    assert recorded[0] == "fairseq-train" and recorded[1] == os.path.join("data-bin", "ptb")
    assert compare.recipe(recorded) == compare.recipe(cmd)
    assert compare.recipe(recorded) != compare.recipe(
        compare.train_command("mdlm", args, "/somewhere/mdlm", seed=2))


@pytest.mark.parametrize("name", ["ptb", "ptb_samplers"])
def test_the_committed_comparisons_runs_are_reused_by_their_recorded_command(name):
    """Their commands as recorded (portable paths) rebuild recipes that --reuse matches:
    every run is taken as recorded, the AR judges' first seeds by their recorded ppl."""
    import shlex
    compare = _compare()
    path = REPO / "examples" / "compare" / "results" / name / "results.json"
    res = reporting.read_json(path)
    args = compare.parse_args(shlex.split(res["command"])[2:] + ["--reuse", str(path)])
    for model, runs in res["runs"].items():
        for run in runs:
            got = compare.reusable(model, run["training"]["seed"], args)
            assert got.get("test", got.get("judge_recorded")) is not None, (model, run)
            assert ("judge_recorded" in got) == (
                compare.evaluator(model) == "eval_lm" and run["training"]["seed"] == 1)


def _results_files():
    for top in ("examples", "benchmarks", "tests"):
        for root, _, files in os.walk(REPO / top):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith((".json", ".md")) or (
                        "results" in path and f.endswith((".log", ".txt"))):
                    yield path


def test_committed_results_name_no_machine_directory():
    offenders = []
    for path in _results_files():
        with open(path, errors="replace") as f:
            if MACHINE_PATH.search(f.read()):
                offenders.append(os.path.relpath(path, REPO))
    assert not offenders, offenders


@pytest.mark.parametrize("values, log", [((128, 135, 159), False), ((5.7, 2080), True)])
def test_axes_are_log_only_over_a_wide_range_and_label_no_minor_ticks(values, log):
    plt = reporting.pyplot()
    fig, ax = plt.subplots()
    ax.plot(values, values)
    reporting.scale(ax, "x", values)
    assert (ax.get_xscale() == "log") == log
    fig.canvas.draw()
    minor = [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    major = [t.get_text() for t in ax.xaxis.get_majorticklabels() if t.get_text()]
    assert not minor and major and not any("^" in t or "times" in t for t in major)
    plt.close(fig)
