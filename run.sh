#!/usr/bin/env bash
# The main job, start to finish on a fresh machine:
#   install -> prepare Penn Treebank -> train a small MDLM -> test perplexity bound -> samples.
# About 20 minutes on 2 CPU cores. MAX_UPDATE=... scales the training budget; run the
# same command again after an interruption and training resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
DATA=data-bin/ptb
SAVE=checkpoints/ptb_mdlm_tiny
DEVICE_FLAGS=()
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEVICE_FLAGS=(--cpu)

echo "== 1/4 prepare Penn Treebank"
bash examples/ptb/prepare.sh "$DATA"

echo "== 2/4 train mdlm_tiny (${MAX_UPDATE:-600} updates)"
bash examples/ptb/train_mdlm.sh "$DATA" "$SAVE"

echo "== 3/4 test-set perplexity bound (NELBO, 4 Monte-Carlo passes, fixed seed)"
fairseq-validate "$DATA" --user-dir mdlm_plugin --task masked_diffusion \
  --path "$SAVE/checkpoint_best.pt" --valid-subset test --batch-size 32 \
  --eval-passes 4 "${DEVICE_FLAGS[@]}" 2>&1 | tee "$SAVE/test_bound.log" | grep -E "valid on 'test'|error"

echo "== 4/4 samples (ddpm_cache, 128 steps): unconditional, a prompt, an infilling template"
printf '\nthe company said\nthe <mask>*3 market was <mask>*4 yesterday\n' | \
  fairseq-interactive "$DATA" --user-dir mdlm_plugin --task masked_diffusion \
  --path "$SAVE/checkpoint_best.pt" --tokens-per-sample 128 --sampler ddpm_cache --steps 128 \
  --gen-length 48 --seed 1 "${DEVICE_FLAGS[@]}" 2>&1 | tee "$SAVE/samples.log" | \
  grep -E "^(S|H)-|mdlm sampling|error"
