"""What the comparison (examples/compare) and every benchmark report with: Markdown
tables, number formatting, the machine / software / git description, paths made portable
for committed results, and one plot style (the same colour and marker for a row in every
figure). No fairseq import; matplotlib is imported
only by :func:`pyplot`.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, NamedTuple, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Style(NamedTuple):
    colour: str
    marker: str


# one (colour, marker) per row name of any comparison, the same in every figure; no two
# models share a colour. A row MODEL@DROPOUT (examples/compare/long_runs.py) keeps its
# model's colour and takes a marker of its dropout from VARIANT_MARKERS instead.
STYLES = {
    "mdlm": Style("tab:blue", "o"), "mdlm_ar": Style("tab:green", "s"),
    "transformer_lm": Style("tab:red", "^"), "sedd": Style("tab:orange", "D"),
    "mdlm_discrete": Style("tab:brown", "v"), "mdlm_iid": Style("tab:pink", "P"),
    "mdlm_timecond": Style("tab:olive", "X"), "bd3_1": Style("darkgoldenrod", "8"),
    "bd3_2": Style("teal", "d"), "bd3_4": Style("tab:purple", "<"),
    "bd3_8": Style("tab:cyan", ">"), "bd3_16": Style("navy", "h"),
    "bd3_32": Style("crimson", "H"), "test data": Style("tab:gray", "_"),
    # the benchmarks' names: models by architecture, MDLM samplers
    "mdlm_tiny": Style("tab:blue", "o"), "mdlm_ar_tiny": Style("tab:green", "s"),
    "bd3_tiny": Style("navy", "h"), "mdlm_tiny_compiled": Style("cornflowerblue", "p"),
    "ddpm": Style("tab:orange", "o"),
    "ddpm_cache": Style("tab:purple", "s"), "first_hitting": Style("tab:brown", "D"),
    "remdm": Style("tab:olive", "v"), "confidence": Style("tab:pink", "^"),
    "analytic": Style("tab:cyan", "P"),
}
# markers of MODEL@DROPOUT rows, by round(10 x dropout) mod 5: dropouts 0, 0.1, ..., 0.4
# apart; none is a model's own marker
VARIANT_MARKERS = ("*", "p", "d", "8", "H")
UNKNOWN = Style("black", "x")
COLOURS = {name: s.colour for name, s in STYLES.items()}
# the translation comparison's series "MODEL DECODER ..." (examples/translation/compare.py):
# the model's colour (none of STYLES') and the decoder's marker
TRANSLATION_COLOURS = {"transformer": "firebrick", "cmlm": "darkorange", "mdlm": "royalblue",
                       "mdlm_kd": "darkviolet"}
DECODER_MARKERS = {"greedy": "^", "beam": "v", "mask-predict": "D", "ddpm": "<",
                   "ddpm_cache": "s", "analytic": ">", "first_hitting": "P", "remdm": "X",
                   "confidence": "o"}


def style(row: str) -> Style:
    """The (colour, marker) of a row name: ``mdlm``, ``bd3_16``, ``mdlm_ar@0.3``, ...;
    translation series ``MODEL DECODER ...`` (``mdlm confidence``, ``transformer beam 5``);
    black crosses for a name the table lacks."""
    words = row.split()
    if row not in STYLES and len(words) > 1 and words[0] in TRANSLATION_COLOURS \
            and words[1] in DECODER_MARKERS:
        return Style(TRANSLATION_COLOURS[words[0]], DECODER_MARKERS[words[1]])
    row, tuned, _ = row.partition("~")         # MODEL@DROPOUT~SOURCE: fine-tuned from SOURCE
    model, at, dropout = row.partition("@")
    base = STYLES.get(model, UNKNOWN)
    if not at:
        return base
    k = round(10 * float(dropout)) + (len(VARIANT_MARKERS) // 2 if tuned else 0)
    return Style(base.colour, VARIANT_MARKERS[k % len(VARIANT_MARKERS)])


# --------------------------------------------------------------------------- numbers, tables

def fmt(x, spec: str = ",.1f", missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def pct(x, digits: int = 0, missing: str = "n/a") -> str:
    """A share in [0, 1] as a percentage."""
    return missing if x is None else f"{100 * x:.{digits}f}%"


def ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def md_table(head: Sequence, rows: Sequence[Sequence], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``r`` right-aligns it
    (``---:``), anything else (or no letter) leaves it plain (``---``)."""
    seps = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "|".join(seps) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def column_table(columns: Sequence, rows: Sequence, align: str = "") -> str:
    """A Markdown table of ``rows`` with the ``(head, cell)`` ``columns``, ``cell(row)``
    giving a row's text; a column that raises KeyError for some row is left out (results
    written before it existed render without it)."""
    keep = []
    for head, cell in columns:
        try:
            keep.append((head, [cell(r) for r in rows]))
        except KeyError:
            continue
    return md_table([h for h, _ in keep], list(zip(*[cells for _, cells in keep])), align)


def in_repo(path: str) -> str:
    """A path relative to the repository root (absolute paths unchanged)."""
    return os.path.join(REPO, path)


# an absolute path inside text: "/" not preceded by a path or word character
_ABSOLUTE = re.compile(r"(?<![\w.~$/-])/(?:[\w.+@%-]+/)*[\w.+@%-]+")


def _top(path: str) -> str:
    """The first component of an absolute path ("work" for /work/runs/x)."""
    return path.lstrip(os.sep).split(os.sep, 1)[0]


def portable_path(path: str, repos: Sequence[str] = (REPO,)) -> str:
    """``path`` as a committed result records it, without the machine's layout: an
    executable in a ``bin`` directory by its name (``fairseq-train``, ``python``), a path
    inside the repository (any of ``repos``) relative to it, one in the temporary directory
    under ``$TMPDIR``, one elsewhere on the repository's or the home directory's top-level
    directory relative to the repository (``../runs/x``). Other paths (``/dev/null``) and
    relative ones are unchanged."""
    if not os.path.isabs(path):
        return path
    p = os.path.normpath(path)
    if os.path.basename(os.path.dirname(p)) == "bin":
        return os.path.basename(p)
    for repo in repos:
        if p == repo or p.startswith(repo + os.sep):
            return os.path.relpath(p, repo)
    tmp = tempfile.gettempdir()
    if p.startswith(tmp + os.sep):
        return "$TMPDIR" + p[len(tmp):]
    if _top(p) in {_top(repos[0]), _top(os.path.expanduser("~"))}:
        return os.path.relpath(p, repos[0])
    return path


def local_path(recorded: str) -> str:
    """A path as :func:`portable_path` recorded it, on this machine: ``$TMPDIR/x`` in the
    temporary directory, a relative path in the repository (the form of everything the
    repository's own scripts record there, run from its root)."""
    if recorded.startswith("$TMPDIR/"):
        return os.path.join(tempfile.gettempdir(), recorded[len("$TMPDIR/"):])
    return recorded if os.path.isabs(recorded) else os.path.join(REPO, recorded)


def portable(obj, repos: Sequence[str] = (REPO,)):
    """``obj`` (text, or lists / tuples / dicts of it, as results.json holds) with every
    absolute path in it made :func:`portable_path`; other values unchanged."""
    if isinstance(obj, str):
        return _ABSOLUTE.sub(lambda m: portable_path(m.group(0), repos), obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(x, repos) for x in obj)
    if isinstance(obj, dict):
        return {k: portable(v, repos) for k, v in obj.items()}
    return obj


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_text(path: str, text: str) -> None:
    """Write a report file (results.json, results.md, a log): its machine paths are made
    :func:`portable`, so a committed result names no directory of the machine it ran on."""
    with open(path, "w") as f:
        f.write(portable(text))


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:      # Linux: the only place with the model name
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dist_version(*names: str) -> str:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def git_revision() -> str:
    """Short hash of the checkout, marked when it has uncommitted changes."""
    def git(*args, timeout=30):
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              timeout=timeout).stdout.strip()
    try:
        rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
        return (rev or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def invocation(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command line that ran ``script`` (``argv``: what main() got instead of sys.argv)."""
    return shlex.join([sys.executable] + (sys.argv if argv is None else [script, *argv]))


def load_average():
    """The 1-, 5- and 15-minute load averages, to two decimals."""
    return [round(x, 2) for x in os.getloadavg()]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str = "cpu", threads: Optional[int] = None,
            gpu: Optional[str] = None) -> Dict[str, object]:
    """What a measurement ran on, as the benchmarks' tables list it."""
    try:
        import torch
        torch_version, threads = torch.__version__, threads or torch.get_num_threads()
    except ImportError:
        torch_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable_cores(),
        "torch_threads": threads, "load_average": load_average(),
        "device": device, "gpu": gpu, "python": platform.python_version(),
        "torch": torch_version, "fairseq": dist_version("fairseq-fixed", "fairseq"),
        "mdlm_plugin": dist_version("mdlm_plugin", "mdlm-plugin"), "git": git_revision(),
    }


def machine_line(m: Dict[str, object]) -> str:
    """One line of :func:`machine`, for a report's header."""
    dev = m.get("gpu") or "CPU only"
    return (f"{m['cpu']}, {m['cpu_cores']} cores, {dev}; Python {m['python']}, "
            f"torch {m['torch']}, fairseq {m['fairseq']}, git {m['git']}")


def machine_table(m: Dict[str, object], keys: Sequence[str]) -> str:
    """The ``| key | value |`` table of the benchmarks' reports (keys with a value)."""
    rows = [f"| {k} | {m[k]} |" for k in keys if m.get(k) is not None]
    return "\n".join(["| | |", "|---|---|"] + rows)


# --------------------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bars(ax, names: Sequence[str], heights: Sequence[float],
         runs: Sequence[Sequence[float]] = (), ylabel: str = ""):
    """One bar per model in its colour over its name, and each run's value as a black dot
    on its model's bar ("individual runs" in the legend). Returns the bars."""
    drawn = ax.bar(range(len(names)), heights, color=[style(n).colour for n in names],
                   width=0.6)
    for x, ys in enumerate(runs):
        ax.scatter([x] * len(ys), ys, color="black", s=14, zorder=3,
                   label="individual runs" if x == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel(ylabel)
    return drawn


def scale(ax, axis: str, values: Sequence[float]) -> None:
    """A log ``axis`` ("x" or "y") when the positive ``values`` span more than 10x, with
    plain labels at 1, 2, 3, 5 x 10^k and none on the minor ticks; linear otherwise (a log
    axis over a narrow range has no decade to label and prints overlapping minor labels)."""
    values = [v for v in values if v and v > 0]
    if not values or max(values) <= 10 * min(values):
        return
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    which = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    which.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    which.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
    which.set_minor_formatter(NullFormatter())


def legend_outside(ax, **kwargs) -> None:
    """The legend to the right of the axes, where it covers no curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              **{"fontsize": 7, **kwargs})


def save_figure(fig, path: str, title: Optional[str] = None) -> None:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")     # legends outside the axes included
    pyplot().close(fig)
