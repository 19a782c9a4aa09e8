#!/usr/bin/env bash
# Stage: align rloo through accelerate (single process, DDP or DeepSpeed ZeRO-2/3).
# Usage: bash launch/rloo.sh CONFIG [--nproc N] [--preset single|ddp|zero2|zero2_offload|zero3|zero3_offload|fsdp2]
#                        [--nnodes N --node-rank R --master-addr A --master-port P] [--dry-run] [key=value ...]
# e.g.   bash launch/rloo.sh configs/rloo.yaml --nproc 8 --preset zero2 output_dir=runs/rloo-8gpu
# Prints the exact command it runs. Options: see launch/_accelerate.sh.
set -euo pipefail
source "$(dirname "$0")/_accelerate.sh"
align_parse_launch_args "$@"
[ ${#REST[@]} -ge 1 ] || { sed -n '3,4p' "$0" >&2; exit 2; }
align_launch rloo "${REST[@]}"
