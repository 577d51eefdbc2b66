#!/usr/bin/env bash
# Japanese-English Bible verse pairs -> sentencepiece -> fairseq binarized bilingual data.
# Usage: examples/bible/prepare.sh [OUT_DIR=data-bin/bible_ja_en] [--help for more]
# Paths are relative to the current directory. See docs/translation.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v python >/dev/null 2>&1; then
  echo "error: 'python' is not on PATH; run scripts/install.sh first (and activate its .venv)" >&2
  exit 1
fi
exec python "$here/prepare.py" "$@"
