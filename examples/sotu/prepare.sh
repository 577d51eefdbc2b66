#!/usr/bin/env bash
# State of the Union speeches -> sentencepiece -> fairseq binarized data.
# Usage: examples/sotu/prepare.sh [OUT_DIR=data-bin/sotu] [--encode-ptb-test] [--help for more]
# Paths are relative to the current directory. See examples/sotu/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../prep_common.sh"
run_prepare "$here/prepare.py" "$@"
