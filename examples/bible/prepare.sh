#!/usr/bin/env bash
# Japanese-English Bible verse pairs -> sentencepiece -> fairseq binarized bilingual data.
# Usage: examples/bible/prepare.sh [OUT_DIR=data-bin/bible_ja_en] [--help for more]
# Paths are relative to the current directory. See docs/translation.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../prep_common.sh"
run_prepare "$here/prepare.py" "$@"
