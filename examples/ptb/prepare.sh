#!/usr/bin/env bash
# Penn Treebank -> fairseq binarized data, checked against the standard token counts.
# Usage: examples/ptb/prepare.sh [OUT_DIR=data-bin/ptb] [--raw-dir data/ptb] [--force]
# Paths are relative to the current directory. See examples/ptb/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../prep_common.sh"
run_prepare "$here/prepare.py" "$@"
