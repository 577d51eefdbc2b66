#!/usr/bin/env bash
# Train MDLM on binarized PTB with fairseq-train: the CPU recipe of the main job.
#   examples/ptb/train_mdlm.sh [DATA=data-bin/ptb] [SAVE_DIR=checkpoints/ptb_mdlm_tiny] [extra fairseq-train flags]
# MAX_UPDATE (default 600) sets the budget: about 15 minutes on 2 CPU cores. The same
# recipe as a fairseq-hydra-train config: examples/ptb/config/mdlm_tiny.yaml (tests/test_recipes.py
# checks that both train the same thing, at mdlm_plugin.recipes.ARCH_SIZES["tiny"]).
# Interrupted? Run the same command again: fairseq resumes from SAVE_DIR/checkpoint_last.pt.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${1:-data-bin/ptb}
SAVE_DIR=${2:-checkpoints/ptb_mdlm_tiny}
shift $(( $# > 2 ? 2 : $# ))
DEVICE_FLAGS=()
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEVICE_FLAGS=(--cpu)
fairseq-train "$DATA" --user-dir "$REPO/mdlm_plugin" \
  --task masked_diffusion --criterion mdlm --arch mdlm_tiny \
  --tokens-per-sample 128 --sample-break-mode none --batch-size 32 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --weight-decay 0.01 --clip-norm 1.0 \
  --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 100 \
  --max-update "${MAX_UPDATE:-600}" --save-interval-updates 100 --keep-interval-updates 1 \
  --no-epoch-checkpoints --validate-interval-updates 200 --eval-passes 1 \
  --save-dir "$SAVE_DIR" --log-format simple --log-interval 25 --seed 1 \
  "${DEVICE_FLAGS[@]}" "$@"
