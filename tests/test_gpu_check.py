"""benchmarks/gpu_check.py --smoke on CPU: the acceptance script's pipeline end to end
(install check, one fairseq-train run through gpu_mfu.py's bf16 entry point with the
NaN check, tokens/s and the table, ddpm_cache sampling), so that the script a first GPU
runs is known not to be broken. Only the mdlm_bf16 training run: each further run
(AR twin, transformer_lm, BD3) is another fairseq-train start of the same code path and
would take the test past a minute on two cores; ``--smoke`` without ``--runs`` runs
them all."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_mode_prints_its_table(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--smoke",
         "--runs", "mdlm_bf16", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| step" in out.stdout and "mdlm_bf16" in out.stdout
    rows = json.load(open(tmp_path / "gpu_check.json"))["rows"]
    assert [r["step"] for r in rows if r["step"] != "install"] == ["train", "sampling"]
    assert any("apex" in r["setting"] for r in rows)
    train, sampling = rows[-2], rows[-1]
    assert train["setting"].startswith("mdlm_bf16: 2x64, L=64")
    assert train["result"].startswith("ok:") and train["tokens_per_s"] > 0
    assert sampling["result"] == "ok" and sampling["tokens_per_s"] > 0
    assert (tmp_path / "gpu_check.md").read_text().count("\n|") >= 4


def test_plan_covers_the_gpu_rows():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import gpu_check
    names = [p[0] for p in gpu_check.train_plan("cuda", apex=True, n_gpus=2)]
    assert names == ["mdlm_bf16", "mdlm_fp16_adamw_fused", "mdlm_ar_bf16",
                     "transformer_lm_bf16", "bd3_sdpa_bf16", "bd3_flex_bf16",
                     "mdlm_fp16_apex_adam", "mdlm_bf16_2gpu_nccl"]
    cpu = [p[0] for p in gpu_check.train_plan("cpu", apex=False, n_gpus=0)]
    assert cpu == ["mdlm_bf16", "mdlm_ar_bf16", "transformer_lm_bf16", "bd3_sdpa_bf16"]
