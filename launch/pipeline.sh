#!/usr/bin/env bash
# The three stages in a row on your own data, each through accelerate with the same launch options:
# SFT -> reward model -> PPO, run dirs OUT/sft, OUT/reward, OUT/ppo chained automatically.
# Usage: bash launch/pipeline.sh [--out runs/pipeline] [--sft configs/sft.yaml] [--reward configs/reward.yaml]
#                                [--ppo configs/ppo.yaml] [--nproc N] [--preset P] [...launch options]
#                                [sft:key=value ...] [reward:key=value ...] [ppo:key=value ...]
# e.g.   bash launch/pipeline.sh --nproc 8 --preset zero3 sft:train.lr=1e-4 ppo:ppo.iterations=500
# A stage whose run dir holds a finished summary.json is skipped; a killed one resumes.
# (The self-contained CPU demo with simulated annotators is `bash launch/quickstart.sh`.)
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
OUT=runs/pipeline; SFT=configs/sft.yaml; RM=configs/reward.yaml; PPO=configs/ppo.yaml
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --sft) SFT=$2; shift 2 ;;
    --reward) RM=$2; shift 2 ;;
    --ppo) PPO=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
align_parse_launch_args ${ARGS[@]+"${ARGS[@]}"}
SFT_O=(); RM_O=(); PPO_O=()
for a in ${REST[@]+"${REST[@]}"}; do
  case "$a" in
    sft:*) SFT_O+=("${a#sft:}") ;;
    reward:*) RM_O+=("${a#reward:}") ;;
    ppo:*) PPO_O+=("${a#ppo:}") ;;
    *) echo "override '$a' must name its stage: sft:KEY=VALUE, reward:KEY=VALUE or ppo:KEY=VALUE" >&2; exit 2 ;;
  esac
done
stage() {  # stage NAME CONFIG OVERRIDES...
  local name=$1 config=$2; shift 2
  local dir="$OUT/$name" resume=false
  if [ -f "$ROOT/$dir/summary.json" ] && ! grep -q stopped_at "$ROOT/$dir/summary.json"; then
    echo "[pipeline] $dir is complete; skipping $name" >&2; return 0
  fi
  [ -f "$ROOT/$dir/config.yaml" ] && resume=true
  align_launch "$name" "$config" "output_dir=$dir" "resume=$resume" "$@"
}
stage sft "$SFT" ${SFT_O[@]+"${SFT_O[@]}"}
stage reward "$RM" "sft_run=$OUT/sft" ${RM_O[@]+"${RM_O[@]}"}
stage ppo "$PPO" "sft_run=$OUT/sft" "reward_run=$OUT/reward" ${PPO_O[@]+"${PPO_O[@]}"}
echo "[pipeline] done: $OUT/{sft,reward,ppo}" >&2
