#!/usr/bin/env bash
# State of the Union speeches -> sentencepiece -> fairseq binarized data.
# Usage: examples/sotu/prepare.sh [OUT_DIR=data-bin/sotu] [--encode-ptb-test] [--help for more]
# Paths are relative to the current directory. See examples/sotu/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v python >/dev/null 2>&1; then
  echo "error: 'python' is not on PATH; run scripts/install.sh first (and activate its .venv)" >&2
  exit 1
fi
exec python "$here/prepare.py" "$@"
