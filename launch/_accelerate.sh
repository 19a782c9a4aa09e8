#!/usr/bin/env bash
# Shared by sft.sh / reward.sh / ppo.sh / dpo.sh / grpo.sh / rloo.sh / pipeline.sh: parse the launch options and run one stage
# through `accelerate launch`, printing the exact command first. Not meant to be called directly.
#
#   --nproc N          processes (GPUs) per node            (env NPROC, default: 1)
#   --preset NAME      configs/accelerate/NAME.yaml: single | ddp | zero2 | zero2_offload |
#                      zero3 | zero3_offload | fsdp2         (env PRESET, default: single if N=1, else zero2)
#   --nnodes N         machines                             (env NNODES, default: 1)
#   --node-rank R      this machine's rank                  (env NODE_RANK, default: 0)
#   --master-addr A    rank 0's address                     (env MASTER_ADDR, default: 127.0.0.1)
#   --master-port P                                          (env MASTER_PORT, default: 29500)
#   --dry-run          print the command only
# Everything else (the config file and key=value overrides) is passed to `align STAGE`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

align_parse_launch_args() {
  NPROC=${NPROC:-1}; PRESET=${PRESET:-}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}; DRY_RUN=${DRY_RUN:-0}
  REST=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --nproc) NPROC=$2; shift 2 ;;
      --preset) PRESET=$2; shift 2 ;;
      --nnodes) NNODES=$2; shift 2 ;;
      --node-rank) NODE_RANK=$2; shift 2 ;;
      --master-addr) MASTER_ADDR=$2; shift 2 ;;
      --master-port) MASTER_PORT=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) sed -n '2,14p' "$ROOT/launch/_accelerate.sh"; exit 0 ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  if [ -z "$PRESET" ]; then
    if [ "$NPROC" = 1 ] && [ "$NNODES" = 1 ]; then PRESET=single; else PRESET=zero2; fi
  fi
  if [ ! -f "$ROOT/configs/accelerate/$PRESET.yaml" ]; then
    echo "unknown preset '$PRESET': choose one of $(cd "$ROOT/configs/accelerate" && ls *.yaml | sed 's/.yaml//' | tr '\n' ' ')" >&2
    exit 2
  fi
}

# align_launch STAGE ARGS... : run `align STAGE ARGS...` under accelerate with the parsed options
align_launch() {
  local stage=$1; shift
  local cmd=(accelerate launch --config_file "configs/accelerate/$PRESET.yaml"
             --num_processes $((NPROC * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK"
             --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
             -m align.cli "$stage" "$@")
  echo "+ ${cmd[*]}" >&2
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  (cd "$ROOT" && TOKENIZERS_PARALLELISM=false "${cmd[@]}")  # W&B mode: see align/tracking.py
}
