#!/usr/bin/env bash
# Entrypoint of both Chrysalis images. It runs whatever command it is given:
#   docker run --gpus all IMAGE torchrun --nproc-per-node 8 pretrain_gpt_vision.py --data-path /data/shards ...
#   docker run IMAGE python -m preprocess build --input /data/x.jsonl ...
#   docker run IMAGE python -m engine.plan --model-preset llama3.1-8b --gpus 64 ...
#   docker run -it IMAGE bash
# Arguments that start with "-" are flags for pretrain_gpt_vision.py (one process):
#   docker run IMAGE --mock-data --train-iters 10
# With no arguments it prints this usage. On the NGC base the command goes through NVIDIA's own entrypoint
# (driver and CUDA-compatibility checks, banner) first.
set -euo pipefail

CHRYSALIS_HOME=${CHRYSALIS_HOME:-/opt/chrysalis}

if [[ $# -eq 0 ]]; then
  sed -n '2,10s/^# \{0,1\}//p' "$0"
  exit 0
fi
if [[ $1 == -* ]]; then
  set -- python "$CHRYSALIS_HOME/pretrain_gpt_vision.py" "$@"
fi

NGC_ENTRYPOINT=/opt/nvidia/nvidia_entrypoint.sh
if [[ -x $NGC_ENTRYPOINT && -z ${CHRYSALIS_SKIP_NGC_ENTRYPOINT:-} ]]; then
  exec "$NGC_ENTRYPOINT" "$@"
fi
exec "$@"
