"""The README and docs/ say what works: every fenced ``bash`` command is checked.

- fairseq commands parse their flags with the plugin loaded (the parsers fairseq's CLIs
  use), scripts and configs they name exist, compare.py commands parse;
- the blocks under a ``<!-- run: tiny -->`` comment run as written, in document order, in
  a scratch directory where ``data-bin/ptb`` is a slice of PTB, with only ``--max-update 2``
  (training) and ``--steps 4`` (diffusion sampling) appended;
- relative links between the docs, and their #anchors, resolve;
- the README's test command is what .ci/run runs.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = DOCS + [REPO / "examples" / d / "README.md"
                 for d in ("compare", "ptb", "sotu", "translation")] + [
    REPO / "benchmarks" / "README.md"]
BLOCK = re.compile(r"(<!-- run: tiny -->\n)?```bash\n(.*?)```", re.S)
TOOLS = {"fairseq-train": "train", "fairseq-validate": "validate", "fairseq-generate": "generate",
         "fairseq-interactive": "interactive", "fairseq-eval-lm": "eval_lm"}
OVERRIDES = {"fairseq-train": ["--max-update", "2"], "fairseq-generate": ["--steps", "4"],
             "fairseq-interactive": ["--steps", "4"]}


def blocks():
    """(doc, tiny?, [command lines]) for every ```bash block: continuation lines joined,
    comments and blank lines dropped."""
    for doc in DOCS:
        for m in BLOCK.finditer(doc.read_text()):
            text = re.sub(r"\\\n\s*", " ", m.group(2))
            lines = [ln.strip() for ln in text.splitlines()]
            yield doc, bool(m.group(1)), [ln for ln in lines if ln and not ln.startswith("#")]


def segments(line):
    """The commands of a shell line: its tokens split at pipes and &&."""
    out, cur = [], []
    for tok in shlex.split(line, comments=True):
        if tok in ("|", "&&"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return out + [cur]


COMMANDS = [(doc, cmd) for doc, _, lines in blocks() for line in lines for cmd in segments(line)]
FAIRSEQ = [(d, c) for d, c in COMMANDS if c[0] in TOOLS or c[:3] == ["python", "-m",
                                                                     "mdlm_plugin.launch_cpu"]]


def _id(item):
    doc, cmd = item
    return f"{doc.relative_to(REPO)}:{cmd[0] if cmd[0] in TOOLS else ' '.join(cmd[:3])}"


def test_the_docs_hold_commands_of_every_cli():
    tools = {c[0] for _, c in FAIRSEQ}
    assert set(TOOLS) <= tools
    assert {c[0] for d, tiny, lines in blocks() if tiny and d.name == "README.md"
            for ln in lines for c in segments(ln)} >= set(TOOLS)


@pytest.mark.parametrize("item", FAIRSEQ, ids=map(_id, FAIRSEQ))
def test_fairseq_commands_parse(item):
    from fairseq import options
    _, cmd = item
    if cmd[0] in TOOLS:
        tool, argv = cmd[0], cmd[1:]
    else:                                   # the CPU launcher: fairseq-train's flags after --
        tool, argv = "fairseq-train", cmd[cmd.index("--") + 1:]
    parser = {"train": options.get_training_parser, "validate": options.get_validation_parser,
              "generate": options.get_generation_parser,
              "interactive": options.get_interactive_generation_parser,
              "eval_lm": options.get_eval_lm_parser}[TOOLS[tool]]()
    try:
        args = options.parse_args_and_arch(parser, argv)
    except SystemExit as err:
        pytest.fail(f"{shlex.join(cmd)}\ndoes not parse (exit {err.code})")
    if tool in ("fairseq-train", "fairseq-validate"):   # fairseq asserts one of them
        assert args.batch_size or args.max_tokens, "needs --batch-size or --max-tokens"
    if "--user-dir" in argv:
        assert argv[argv.index("--user-dir") + 1] == "mdlm_plugin"


def _module(path, name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_and_configs_named_by_the_docs_exist_and_parse():
    # the comparisons' commands parse as their scripts read them
    parsers = {path: _module(path, name).parse_args for path, name in (
        ("examples/compare/compare.py", "compare_for_docs"),
        ("examples/translation/compare.py", "translation_compare_for_docs"))}
    checked = 0
    for _, cmd in COMMANDS:
        if cmd[0] in ("bash", "python") and cmd[1].endswith((".sh", ".py")):
            assert (REPO / cmd[1]).is_file(), cmd
            checked += 1
            if cmd[1] in parsers:
                parsers[cmd[1]](cmd[2:])
        if cmd[0] == "fairseq-hydra-train":
            d, name = cmd[cmd.index("--config-dir") + 1], cmd[cmd.index("--config-name") + 1]
            assert (REPO / d / f"{name}.yaml").is_file()
            checked += 1
    assert checked >= 10


def _markers(tool):
    return {"fairseq-train": r"done training", "fairseq-validate": r"valid on 'test' subset",
            "fairseq-generate": r"(?m)^H-\d", "fairseq-interactive": r"(?m)^H-\d",
            "fairseq-eval-lm": r"Perplexity: \d"}[tool]


def test_quick_commands_run_as_written_on_tiny_data(ptb_tiny, tmp_path):
    (tmp_path / "data-bin").mkdir()
    (tmp_path / "data-bin" / "ptb").symlink_to(ptb_tiny)
    for name in ("mdlm_plugin", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    ran = []
    for doc, tiny, lines in blocks():
        for line in (ln for ln in lines if tiny):
            tool = next(c[0] for c in segments(line) if c[0] in TOOLS)
            if tool == "fairseq-train" or "masked_diffusion" in line:   # MDLM's --steps
                line = " ".join([line, *OVERRIDES.get(tool, [])])
            proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"{doc.name}: {line}\n{out[-3000:]}"
            words = shlex.split(line)
            if "--results-path" in words:       # fairseq-generate writes its lines there
                results = tmp_path / words[words.index("--results-path") + 1]
                out += "".join(f.read_text() for f in sorted(results.iterdir()))
            assert re.search(_markers(tool), out), f"{doc.name}: {line}\n{out[-3000:]}"
            ran.append(tool)
    assert set(ran) == set(TOOLS)


def _slug(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad, count = [], 0
    for doc in LINKED:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            count += 1
            if not dest.exists():
                bad.append(f"{doc.relative_to(REPO)}: {target}")
            elif anchor and (dest.is_dir() or anchor not in {
                    _slug(h) for h in re.findall(r"(?m)^#+ (.*)$", dest.read_text())}):
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert count >= 30 and not bad, bad


def test_readme_test_command_is_what_ci_runs():
    readme = [shlex.split(ln, comments=True) for d, _, lines in blocks()
              if d.name == "README.md" for ln in lines if "pytest" in ln]
    ci = [shlex.split(ln) for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if "pytest" in ln]
    assert len(readme) == 1 and len(ci) == 1
    # .ci/run adds only "-p no:cacheprovider" (no .pytest_cache in a clean clone)
    i = ci[0].index("-p")
    assert ci[0][:i] + ci[0][i + 2:] == readme[0] and ci[0][i + 1] == "no:cacheprovider"
