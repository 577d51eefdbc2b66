"""The benchmarks' reports (benchmarks/*.py --report-only): the committed results re-render
byte for byte, and the rows added for issues 10 and 13 render from their JSON."""
import copy
import importlib.util
import json
import shutil
import sys

import torch

from conftest import REPO
from mdlm_plugin.diffusion.schedules import build_schedule

RESULTS = REPO / "benchmarks" / "results"


def _script(name):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sampling_report_only_reproduces_the_committed_results(tmp_path):
    ss = _script("sampling_speed")
    shutil.copy(RESULTS / "sampling" / "results.json", tmp_path / "results.json")
    ss.main(["--report-only", "--output-dir", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == \
        (RESULTS / "sampling" / "results.md").read_text()
    assert (tmp_path / "sampling_speed.png").stat().st_size > 10_000


def test_cache_rows_compare_scores_and_the_new_tables_render():
    ss = _script("sampling_speed")
    res = json.loads((RESULTS / "sampling" / "results.json").read_text())
    stats = {"row_calls": 10, "wall_s": 2.0, "cpu_s": 2.0, "other_load": 0.0}
    tokens, scores = torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 4)
    moved = scores.clone()
    moved[1, 2] = -0.25                      # one token drawn from another distribution
    same = ss.cache_row({"ddpm": (tokens, scores, stats), "ddpm_cache": (tokens, scores, stats)},
                        8, 2, 2, build_schedule("loglinear"), 4)
    differ = ss.cache_row({"ddpm": (tokens, scores, stats), "ddpm_cache": (tokens, moved, stats)},
                          8, 2, 2, build_schedule("loglinear"), 4)
    assert same["identical"] and same["identical_scores"]
    assert differ["identical"] and not differ["identical_scores"]
    assert differ["max_score_difference"] == 0.25
    new = copy.deepcopy(res)
    new["cache_vs_ddpm"] = [same, differ]
    new["long_samples"] = [
        {"model": m, "method": f"method of {m}", "length": 512, "samples": 2, "steps_per_token": t,
         "network_calls": c, "row_calls": 2 * c, "s_per_sample": 1.5, "cpu_s_per_sample": 1.25,
         "x_transformer_lm_wall": x, "gen_ppl": 300.0, "gen_ppl_se": 12.5}
        for m, t, c, x in (("bd3_tiny", 1.0, 544, 2.0), ("transformer_lm", None, 513, 1.0))]
    text = ss.markdown_report(new)
    cache = [line for line in text.splitlines() if line.startswith("| 8 | 2 | 2 |")]
    assert len(cache) == 2 and "| yes | yes |" in cache[0] and "| yes | NO (max diff 0.25) |" \
        in cache[1]
    assert "## 3. 2 samples of 512 tokens: block diffusion vs MDLM semi-AR vs AR" in text
    assert ("| bd3_tiny | method of bd3_tiny | 1.00 | 544 | 1088 | 1.50 | 1.25 | 2.00 | "
            "300.0 ± 12.5 |") in text
    assert "| transformer_lm | method of transformer_lm | 1 (AR) | 513 |" in text


def test_throughput_report_renders_the_committed_results_and_a_bd3_column():
    tt = _script("train_throughput")
    for sub in ("", "threads1"):
        res = json.loads((RESULTS / sub / "results.json").read_text())
        assert tt.markdown_report(res) == (RESULTS / sub / "results.md").read_text()
    runs = res["runs"]
    bd3_runs = [dict(r, model=tt.BD3, wps_median=r["wps_median"] / 2) for r in runs
                if r["model"] == tt.MDLM]
    summary = tt.summarize(runs + bd3_runs, "cpu")
    tokens = next(row for row in summary if row["key"] == "wps_median")
    assert tokens["bd3_over_mdlm"] == 0.5 and tokens["ratio"] == res["summary"][0]["ratio"]
    text = tt.markdown_report(dict(res, summary=summary, runs=runs + bd3_runs))
    assert "| metric | mdlm_tiny | transformer_lm | ratio | bd3_tiny | BD3 / MDLM |" in text
    assert f"| {tokens['metric']} | {tokens['mdlm']:,.1f} | " in text and "| 0.500 |" in text
    assert text.count("```") == 2 * 3 + 2          # the command of each of the three models
