"""Converted reference checkpoints (mdlm_plugin/convert.py) against the REFERENCE code.

tests/fixtures/reference/ was made once by scripts/make_reference_fixture.py from
kuleshov-group/mdlm and kuleshov-group/bd3lms (``expected.pt['record']`` names the
commits and the command): tiny random reference checkpoints in the authors' formats,
the reference's draws of t and x_t, its logits and its NELBO. Our converted models,
loaded the way fairseq-validate / fairseq-generate load them, must reproduce them.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary

from mdlm_plugin.convert import convert, convert_back, load_lightning
from mdlm_plugin.diffusion.objective import nelbo
from mdlm_plugin.errors import MDLMUserError

FIX = Path(__file__).resolve().parent / "fixtures" / "reference"
EXPECTED = torch.load(FIX / "expected.pt", weights_only=True)
V = EXPECTED["mdlm"]["logits"].shape[-1]          # reference vocabulary, mask last
EOS, MASK = V - 2, V - 1
CASES = {"mdlm": FIX / "mdlm.ckpt", "mdlm_tc": FIX / "mdlm_tc_hf", "bd3lm": FIX / "bd3lm.ckpt"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {name: root / name for name in CASES}
    for name, src in CASES.items():
        convert(str(src), str(out[name]))
    out["mdlm_raw"] = root / "mdlm_raw"
    convert(str(CASES["mdlm"]), str(out["mdlm_raw"]), use_ema=False)
    return out


def load(out_dir):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(out_dir / "checkpoint.pt")], arg_overrides={"data": str(out_dir)})
    return models[0].eval(), task


def fairseq_ids(ref_ids, task):
    """Reference ids -> fairseq ids through the converted dictionary, as text encoded
    with GPT-2 BPE reaches it: id k is the symbol "k"; <|endoftext|> is the </s>
    fairseq-preprocess writes at each line end; the mask is the task's <mask>."""
    d = task.source_dictionary
    table = {EOS: d.eos(), MASK: task.mask_index}
    return ref_ids.clone().apply_(lambda k: table.get(k, d.index(str(k))))


def reference_rows(task):
    """For each fairseq row, the reference row it holds (-1: none)."""
    d = task.source_dictionary
    return torch.tensor([EOS if i == d.eos() else MASK if i == task.mask_index else
                         int(s) if s.isdigit() else -1 for i, s in enumerate(d.symbols)])


def our_logits(name, model, task):
    exp = EXPECTED["bd3lm" if name == "bd3lm" else name.replace("_raw", "")]
    x0, zt = fairseq_ids(EXPECTED["x0"], task), fairseq_ids(exp["xt"], task)
    with torch.no_grad():
        if name == "bd3lm":
            return model.backbone.forward_blocks(zt, x0, model.block_size)
        return model(zt, sigma=task.schedule.sigma(exp["t"]))


@pytest.mark.parametrize("name,key", [("mdlm", "logits"), ("mdlm_raw", "logits_raw"),
                                      ("mdlm_tc", "logits"), ("bd3lm", "logits")])
def test_logits_equal_the_reference_networks(converted, name, key):
    """MDLM (EMA and raw weights of a Lightning .ckpt), MDLM with time conditioning
    (Hugging Face layout) and BD3-LM (block-causal attention over [x_t, x_0]):
    every reference logit is reproduced to 1e-5 in fp32, in fairseq's row order;
    the rows the reference has not (<s>, <pad>, <unk>) are -inf."""
    model, task = load(converted[name])
    ours = our_logits(name, model, task)
    ref = EXPECTED["bd3lm" if name == "bd3lm" else name.replace("_raw", "")][key]
    rows = reference_rows(task)
    have = rows >= 0
    assert ours.shape[-1] == len(rows) == V + 3
    assert (ours[..., have] - ref[..., rows[have]]).abs().max() < 1e-5
    assert torch.isneginf(ours[..., ~have]).all()
    assert task.source_dictionary[int((~have).nonzero()[0])] == "<s>"
    assert int((~have).sum()) == 3


def test_ema_is_the_default_and_differs_from_raw(converted):
    """The Lightning .ckpt's EMA shadow (parameter order) is what converts by default."""
    ema = EXPECTED["mdlm"]["logits"]
    assert (ema - EXPECTED["mdlm"]["logits_raw"]).abs().max() > 0.1


@pytest.mark.parametrize("name", ["mdlm", "mdlm_tc", "bd3lm"])
def test_nelbo_equals_the_references(converted, name):
    """The reference's NELBO of its own draw (t, x_t): ours on the same draw."""
    model, task = load(converted[name])
    exp = EXPECTED[name]
    x0, zt = fairseq_ids(EXPECTED["x0"], task), fairseq_ids(exp["xt"], task)
    with torch.no_grad():
        terms = nelbo(model.denoiser(clean=x0) if name == "bd3lm" else model.denoiser(),
                      x0, task.schedule, task.mask_index, t=exp["t"], z_t=zt)
    assert terms.n_tokens == x0.numel() and terms.n_masked == int(exp["xt"].eq(MASK).sum())
    assert abs(float(terms.loss) / terms.n_tokens - float(exp["nelbo"])) \
        < 1e-5 * float(exp["nelbo"])


def test_checkpoint_is_plain_data_and_records_the_architecture(converted):
    """Loads with weights_only=True; cfg sections are fairseq's; BD3's block size,
    time conditioning and the window come from the reference config."""
    for name in ("mdlm", "mdlm_tc", "bd3lm"):
        state = torch.load(converted[name] / "checkpoint.pt", weights_only=True)
        assert {"common", "model", "task", "criterion"} <= set(state["cfg"])
        m = state["cfg"]["model"]
        assert (m["_name"], m["embed_dim"], m["layers"], m["attention_heads"],
                m["cond_dim"]) == ("mdlm_base", 16, 2, 2, 8)
        assert m["time_conditioning"] == (name == "mdlm_tc")
        assert m["block_size"] == (2 if name == "bd3lm" else None)
        assert state["task_state"]["tokens_per_sample"] == 8


def test_dictionary_maps_gpt2_ids_to_their_rows(converted):
    """A made-up GPT-2-style id sequence, as fairseq-preprocess --srcdict dict.txt
    encodes it (ids as symbols, </s> at the line end), lands on fairseq ids whose
    embedding and output rows are the reference's rows of those ids."""
    ref = load_lightning(CASES["mdlm"])["state_dict"]
    d = Dictionary.load(str(converted["mdlm_raw"] / "dict.txt"))
    assert len(d) == V - 2 + d.nspecial and not any("madeupword" in s for s in d.symbols)
    gpt2_ids = [17, 0, 36, 5, 5, 21]
    encoded = d.encode_line(" ".join(map(str, gpt2_ids)), add_if_not_exist=False)
    assert encoded[-1] == d.eos() and d.unk() not in encoded.tolist()
    model, task = load(converted["mdlm_raw"])
    emb, head = model.backbone.embed.weight, model.backbone.final.head.weight
    for fid, rid in zip(encoded.tolist(), gpt2_ids + [EOS]):
        assert torch.equal(emb[fid], ref["backbone.vocab_embed.embedding"][rid])
        assert torch.equal(head[fid], ref["backbone.output_layer.linear.weight"][rid])
    assert torch.equal(emb[task.mask_index], ref["backbone.vocab_embed.embedding"][MASK])


def test_reverse_direction_restores_the_reference_tensors(converted, tmp_path):
    """ours -> the reference's HF layout gives back the reference's (raw) tensors,
    rows in reference id order, and converts forward again to the same model."""
    out = tmp_path / "back"
    cfg = convert_back(str(converted["bd3lm"] / "checkpoint.pt"), str(out))
    assert (cfg["model_type"], cfg["block_size"], cfg["n_heads"]) == ("bd3lm", 2, 2)
    back = torch.load(out / "pytorch_model.bin", weights_only=True)
    ref = load_lightning(CASES["bd3lm"])["state_dict"]
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert torch.equal(back[k], v), k
    again = tmp_path / "again"
    convert(str(out), str(again))
    a = torch.load(again / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(converted["bd3lm"] / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bad_lightning(tmp_path, mutate):
    ckpt = load_lightning(CASES["mdlm"])
    mutate(ckpt)
    path = tmp_path / f"{mutate.__name__}.ckpt"
    torch.save(ckpt, path)
    return path


def test_each_bad_input_is_one_clear_error(tmp_path):
    def duo(c):
        c["hyper_parameters"]["config"]["algo"] = {"name": "duo", "parameterization": "mean"}

    def stretch(c):
        sd = c["state_dict"]
        sd["backbone.blocks.1.mlp.0.weight"] = torch.zeros(48, 16)
        del c["ema"]

    def no_heads(c):
        del c["hyper_parameters"]["config"]["model"]["n_heads"]

    torch.save({"model": {}}, tmp_path / "fairseq_like.pt")
    (tmp_path / "empty_dir").mkdir()
    hf_duo = tmp_path / "duo_hf"
    shutil.copytree(CASES["mdlm_tc"], hf_duo)
    cfg = json.loads((hf_duo / "config.json").read_text())
    (hf_duo / "config.json").write_text(json.dumps(dict(cfg, model_type="duo")))
    cases = [
        (tmp_path / "fairseq_like.pt", "not a checkpoint layout the converter knows"),
        (tmp_path / "empty_dir", "not a checkpoint layout the converter knows"),
        (_bad_lightning(tmp_path, duo), "uniform-state"),
        (hf_duo, "uniform-state"),
        (_bad_lightning(tmp_path, stretch), "no architecture the converter knows explains"),
        (_bad_lightning(tmp_path, no_heads), "pass --heads"),
    ]
    for path, message in cases:
        with pytest.raises(MDLMUserError, match=message):
            convert(str(path), str(tmp_path / "out"))
    # --heads supplies what the config lacks
    assert convert(str(_bad_lightning(tmp_path, no_heads)), str(tmp_path / "h"),
                   heads=2)["heads"] == 2


def test_cli_prints_one_error_line(tmp_path):
    (tmp_path / "x.txt").write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "mdlm_plugin.convert", str(tmp_path / "x.txt"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 1
    assert errors[0].startswith("mdlm_plugin.convert: error: cannot read")


def test_converted_models_run_through_fairseq_clis(converted, tmp_path):
    """A tiny data set of made-up GPT-2 ids binarized with the converted dict.txt:
    fairseq-validate reports the bound, fairseq-train --finetune-from-model trains on
    (fairseq's adam with weight decay: the -inf rows stay -inf and out of the samples),
    fairseq-generate samples the BD3-LM block by block and fairseq-interactive fills a
    template; no sample holds <s>, <pad>, <unk> or <mask>."""
    from conftest import USER_DIR, fairseq_cli

    gen = torch.Generator().manual_seed(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 24), ("valid", 8)):
        lines = [" ".join(str(int(k)) for k in torch.randint(0, V - 2, (int(m),), generator=gen))
                 for m in torch.randint(3, 12, (n,), generator=gen)]
        (raw / f"{split}.txt").write_text("\n".join(lines) + "\n")
    data = tmp_path / "bin"
    fairseq_cli("preprocess", "--only-source", "--srcdict", converted["mdlm"] / "dict.txt",
                "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
                "--destdir", data, "--workers", "1")
    plugin = ["--user-dir", USER_DIR, "--task", "masked_diffusion", "--cpu"]

    out = fairseq_cli("validate", data, *plugin, "--path", converted["mdlm"] / "checkpoint.pt",
                      "--batch-size", "4", "--eval-passes", "2")
    bound = re.search(r"valid on 'valid' subset \| loss ([\d.]+)", out.stdout + out.stderr)
    assert bound and 0 < float(bound.group(1)) < 50

    save = tmp_path / "ft"
    fairseq_cli("train", data, *plugin, "--finetune-from-model",
                converted["mdlm"] / "checkpoint.pt", "--arch", "mdlm_base", "--embed-dim", "16",
                "--layers", "2", "--attention-heads", "2", "--cond-dim", "8",
                "--tokens-per-sample", "8", "--max-positions", "8", "--criterion", "mdlm",
                "--optimizer", "adam", "--lr", "1e-2", "--weight-decay", "0.1",
                "--batch-size", "4", "--max-update", "3", "--save-dir", save,
                "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "1")
    before = torch.load(converted["mdlm"] / "checkpoint.pt", weights_only=True)["model"]
    after = torch.load(save / "checkpoint_last.pt", weights_only=False)["model"]
    assert not torch.equal(after["backbone.embed.weight"], before["backbone.embed.weight"])
    assert torch.equal(after["backbone.logit_mask"], before["backbone.logit_mask"])
    assert all(torch.isfinite(v).all() for k, v in after.items() if k != "backbone.logit_mask")

    symbols = re.compile(r"\d+( \d+)*")
    out = fairseq_cli("generate", data, *plugin, "--path", converted["bd3lm"] / "checkpoint.pt",
                      "--gen-subset", "valid", "--batch-size", "4", "--steps", "2",
                      "--gen-length", "24", "--seed", "2", "--stop-at-eos")
    hyps = re.findall(r"^H-\d+\t\S+\t(.*)$", out.stdout, re.M)
    scores = re.findall(r"^P-\d+\t(.*)$", out.stdout, re.M)
    # --stop-at-eos is a block model's option: each sample is 24 tokens or ends at its
    # first </s> (<|endoftext|>), which fairseq leaves out of the text
    assert len(hyps) == len(scores) >= 4 and all(1 <= len(p.split()) <= 24 for p in scores)
    assert all(len(h.split()) == 24 for h, p in zip(hyps, scores) if len(p.split()) == 24)
    assert all(symbols.fullmatch(h) for h in hyps if h), hyps

    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.interactive", converted["mdlm_tc"], *plugin,
         "--path", converted["mdlm_tc"] / "checkpoint.pt", "--steps", "3", "--nbest", "2",
         "--sampler", "ddpm"],
        input="5 <mask>*3 7\n", capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"))
    hyps = re.findall(r"^H-\d+\t\S+\t(.*)$", proc.stdout, re.M)
    scores = re.findall(r"^P-\d+\t(.*)$", proc.stdout, re.M)
    assert proc.returncode == 0 and len(hyps) == 2, proc.stderr[-2000:]
    # the template's 5 positions; a filled </s> is left out of the printed text
    assert len(scores) == 2 and all(len(p.split()) == 5 for p in scores)
    assert all(re.fullmatch(r"5( \d+){0,3} 7", h) for h in hyps), hyps
