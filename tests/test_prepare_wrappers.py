"""examples/<corpus>/prepare.sh: each runs the prepare.py beside it with its arguments as
given, by the python on PATH, and without one says how to get it (examples/prep_common.sh)."""
import os
import shutil
import subprocess

import pytest

from conftest import REPO

CORPORA = ("ptb", "sotu", "bible")


def bin_dir(path, python=True):
    """A PATH directory with bash and dirname, and a python that prints its arguments."""
    path.mkdir()
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), path / tool)
    if python:
        (path / "python").write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
        (path / "python").chmod(0o755)
    return str(path)


@pytest.mark.parametrize("corpus", CORPORA)
def test_prepare_sh_runs_its_prepare_py_with_its_arguments(corpus, tmp_path):
    script = os.path.relpath(REPO / "examples" / corpus / "prepare.sh", tmp_path)
    proc = subprocess.run([shutil.which("bash"), script, "out dir", "--force"], cwd=tmp_path,
                          env={"PATH": bin_dir(tmp_path / "bin")}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    script_arg, *rest = proc.stdout.splitlines()
    assert os.path.realpath(script_arg.strip("[]")) == str(REPO / "examples" / corpus /
                                                          "prepare.py")
    assert rest == ["[out dir]", "[--force]"]


@pytest.mark.parametrize("corpus", CORPORA)
def test_prepare_sh_without_python_says_how_to_get_it(corpus, tmp_path):
    proc = subprocess.run([shutil.which("bash"), str(REPO / "examples" / corpus / "prepare.sh")],
                          env={"PATH": bin_dir(tmp_path / "bin", python=False)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and not proc.stdout
    assert proc.stderr == ("error: 'python' is not on PATH; run scripts/install.sh first "
                           "(and activate its .venv)\n")
