#!/usr/bin/env python
"""Issue 12's training-noise A/B: MDLM by compare.py's recipe, the criterion's keyed noise
(the plugin's; compare.py's own runs) against torch's global stream (the criterion before
commit 857442a, made here by a wrapper whose ``_train_generator`` returns None).

    python examples/compare/noise_ab.py --train 1 2 3 1001 --work-dir DIR --keyed-dir RUNS
    python examples/compare/noise_ab.py --report-only

fairseq reseeds torch's global stream to ``--seed + update`` before every update
(``Trainer._set_seed``), so with the global stream seed s + 1 draws at update u exactly the
times and masks seed s drew at update u + 1: seeds 1-3 share one noise sequence; seed
1001's is disjoint from theirs. The keyed noise of seeds 1-3 is independent per seed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from mdlm_plugin import recipes, reporting  # noqa: E402

OUT = os.path.join(compare.REPO, "examples", "compare", "results", "ptb_noise")
WRAPPER = ("import sys\nfrom fairseq_cli.train import cli_main\n"   # fairseq's log format first
           "from mdlm_plugin.criterions import bound\n"
           "bound.DiffusionBoundCriterion._train_generator = lambda self, sample, device: None\n"
           "sys.argv = ['fairseq-train'] + sys.argv[1:]\ncli_main()\n")


def run_dir(arm: str, seed: int, args) -> str:
    if arm == "keyed":
        return compare.run_dir("mdlm", seed, args.cargs)
    return os.path.join(args.work_dir, "mdlm_global" + ("" if seed == 1 else f"_seed{seed}"))


def train_global(seed: int, args) -> None:
    """compare.py's MDLM command for ``seed`` through the global-stream wrapper."""
    save = run_dir("global", seed, args)
    last = os.path.join(save, "checkpoint_last.pt")     # an interrupted run resumes
    if os.path.isfile(last) and compare.updates_done(last) >= args.cargs.max_update:
        return
    cmd = [str(t) for t in compare.train_command("mdlm", args.cargs, save, seed)]
    env = dict(os.environ, PYTHONPATH=compare.REPO, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.makedirs(save, exist_ok=True)
    with open(save + ".log", "a") as log:
        subprocess.run([sys.executable, "-c", WRAPPER] + cmd[1:], env=env, cwd=compare.REPO,
                       stdout=log, stderr=subprocess.STDOUT, check=True)


def collect(arm: str, seed: int, args) -> dict:
    d = run_dir(arm, seed, args)
    log = d + ".log" if arm == "global" else os.path.join(d, "train.log")
    with open(log) as f:
        # (logs of an earlier wrapper that set up logging before fairseq did)
        curve = compare.read_train_log(f.read().replace("INFO:valid:{", "| valid | {"))
    curve = curve["valid_curve"]
    ppl, se = test_bound(os.path.join(d, "checkpoint_last.pt"), args)
    # global seeds closer than --max-update draw overlapping noise sequences
    near = [s for s in args.train if abs(s - seed) < args.cargs.max_update] \
        if arm == "global" else [seed]
    return {"arm": arm, "seed": seed, "valid_curve": curve, "test_ppl": ppl, "test_ppl_se": se,
            "noise": "own" if len(near) == 1 else
            f"shared by global seeds {', '.join(map(str, near))}"}


def test_bound(ckpt: str, args):
    """(bound, SE) on PTB test: compare.evaluate's, read from its log when it ran already."""
    log = os.path.join(os.path.dirname(ckpt), "eval_test.log")
    if os.path.isfile(log):
        with open(log) as f:
            records = recipes.json_records(f.read(), "test")
        if records:
            r = recipes.numbers(records[-1])
            return r["test_ppl"], r.get("test_ppl_se")
    t = compare.evaluate("mdlm", ckpt, args.cargs.data, args.cargs, "test")
    return t["ppl"], t["ppl_se"]


def report(res: dict, out: str = OUT) -> None:
    ups = [u for u, _ in res["runs"][0]["valid_curve"] if u % 100 == 0]
    rows = [[r["arm"], r["seed"], r["noise"]] + [f"{dict(r['valid_curve'])[u]:.1f}" for u in ups]
            + [f"<= {r['test_ppl']:.1f} ({r['test_ppl_se']:.1f})"] for r in res["runs"]]
    groups = [("keyed", [r for r in res["runs"] if r["arm"] == "keyed"])] + [
        (f"global, {noise}", [r for r in res["runs"] if r["noise"] == noise])
        for noise in dict.fromkeys(r["noise"] for r in res["runs"] if r["noise"] != "own")]
    lines = ["# MDLM training noise: keyed per micro-batch vs torch's global stream (PTB)", "",
             res["doc"], "", f"Command: `{res['command']}`  ", f"Machine: {res['machine']}", "",
             reporting.md_table(["noise", "seed", "noise sequence"]
                                + [f"valid @{u}" for u in ups] + ["test bound (eval SE)"], rows),
             ""] + [f"- {name}: test mean {statistics.fmean(r['test_ppl'] for r in g):.1f} ± "
                    f"{statistics.stdev(r['test_ppl'] for r in g):.1f} sd" for name, g in groups
                    if len(g) > 1] + ["", "![validation curves](valid_curves.png)", ""]
    reporting.write_text(os.path.join(out, "results.md"), "\n".join(lines))
    fig, ax = reporting.pyplot().subplots(figsize=(7, 4))
    colours = {}                    # one colour per seed, one marker and line style per arm
    for r in res["runs"]:
        style = "-" if r["arm"] == "keyed" else ":" if r["noise"] == "own" else "--"
        colour = colours.setdefault(r["seed"], f"C{len(colours) % 10}")
        ax.plot(*zip(*r["valid_curve"]), style, color=colour, ms=4,
                marker="o" if r["arm"] == "keyed" else "s", label=f"{r['arm']} seed {r['seed']}")
    ax.set(xlabel="updates (32 x 128 tokens each)",
           ylabel="validation bound (perplexity per token)")
    reporting.scale(ax, "y", [y for r in res["runs"] for _, y in r["valid_curve"]])
    reporting.legend_outside(ax)
    reporting.save_figure(fig, os.path.join(out, "valid_curves.png"),
                          "MDLM on PTB, validation bound: keyed (solid) vs global-stream noise "
                          "(dashed: shared sequence, dotted: its own)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, nargs="*", default=[], help="global-stream seeds")
    p.add_argument("--keyed", type=int, nargs="*", default=[1, 2, 3], help="keyed seeds")
    p.add_argument("--work-dir", default="checkpoints/noise_ab")
    p.add_argument("--keyed-dir", default="checkpoints/compare_ptb", help="compare's runs")
    p.add_argument("--out", default=OUT, help="results")
    p.add_argument("--report-only", action="store_true", help="re-render from results.json")
    args = p.parse_args(argv)
    if args.report_only:
        return report(reporting.read_json(os.path.join(args.out, "results.json")), args.out)
    args.cargs = compare.parse_args(["--corpus", "ptb", "--threads", "1",
                                     "--work-dir", args.keyed_dir])
    for seed in args.train:
        train_global(seed, args)
    runs = [collect("keyed", s, args) for s in args.keyed] + \
        [collect("global", s, args) for s in args.train]
    res = {"doc": __doc__.split("\n\n")[2].replace("\n", " "), "runs": runs,
           "command": reporting.invocation(__file__, argv),
           "machine": reporting.machine_line(reporting.machine("cpu", 1))}
    os.makedirs(args.out, exist_ok=True)
    reporting.write_text(os.path.join(args.out, "results.json"), json.dumps(res, indent=1))
    report(res, args.out)


if __name__ == "__main__":
    main()
