#!/usr/bin/env bash
# One node's share of a multi-node run: a torchrun agent that starts this node's ranks.
# train.sbatch starts one of these per node with srun; tests/test_multinode.py starts two on one machine.
#
#   torchrun_node.sh pretrain_gpt_vision.py --data-path ... (training flags)
#
# Rendezvous: c10d, hosted by node 0 of the allocation (is_host=1 there, a client everywhere else), so no
# separate rendezvous service is needed. Settings come from SLURM's environment or these variables:
#   NNODES (SLURM_NNODES), NODE_RANK (SLURM_NODEID), NPROC_PER_NODE (SLURM_GPUS_ON_NODE, else 8),
#   RDZV_HOST (first host of SLURM_JOB_NODELIST), RDZV_PORT (29500), RDZV_ID (SLURM_JOB_ID),
#   MAX_RESTARTS (0), TORCHRUN (torchrun; e.g. "python -m torch.distributed.run").
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/slurm/env.sh
source "$HERE/env.sh"

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if [[ -z ${RDZV_HOST:-} ]]; then
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # not head: SIGPIPE under pipefail
  else
    RDZV_HOST=127.0.0.1
  fi
fi
RDZV_PORT=${RDZV_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-chrysalis}}
IS_HOST=0
[[ $NODE_RANK == 0 ]] && IS_HOST=1
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"

echo "node $NODE_RANK/$NNODES on $(hostname): $NPROC_PER_NODE ranks, rendezvous $RDZV_HOST:$RDZV_PORT (id $RDZV_ID)" >&2
exec "${TORCHRUN_CMD[@]}" \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
  --rdzv-id "$RDZV_ID" \
  --rdzv-conf "is_host=$IS_HOST" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  "$@"
