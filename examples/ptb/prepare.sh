#!/usr/bin/env bash
# Penn Treebank -> fairseq binarized data, checked against the standard token counts.
# Usage: examples/ptb/prepare.sh [OUT_DIR=data-bin/ptb] [--raw-dir data/ptb] [--force]
# Paths are relative to the current directory. See examples/ptb/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v python >/dev/null 2>&1; then
  echo "error: 'python' is not on PATH; run scripts/install.sh first (and activate its .venv)" >&2
  exit 1
fi
exec python "$here/prepare.py" "$@"
