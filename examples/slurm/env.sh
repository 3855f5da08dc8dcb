# shellcheck shell=bash
# Communication defaults for multi-node Chrysalis runs; sourced by torchrun_node.sh and preprocess.sbatch.
# Every setting keeps a value already in the environment, so a site profile or the sbatch script can override it.
# What each one does, and when to change it: docs/cluster.md ("Environment").

# Interface for NCCL's bootstrap and gloo's sockets. Unset: NCCL picks InfiniBand/RoCE, then any interface
# but lo/docker*; gloo uses the interface of this host's name. Set it when the hostname resolves to the wrong
# network (a management Ethernet instead of the fabric), e.g. CHRYSALIS_SOCKET_IFNAME=ib0 or eth1.
if [[ -n ${CHRYSALIS_SOCKET_IFNAME:-} ]]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$CHRYSALIS_SOCKET_IFNAME}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$CHRYSALIS_SOCKET_IFNAME}
fi

# Errors and warnings only; NCCL_DEBUG=INFO prints the chosen transport (NET/IB vs NET/Socket) at start-up,
# the first thing to check when cross-node bandwidth is low.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# FSDP2 frees all-gathered parameters by stream events instead of recordStream (lower peak memory).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# A collective that fails or times out tears the job down instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# NCCL flight recorder: the last 2000 collectives per rank, dumped on a timeout (find the rank that diverged).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# Python stack of every thread on a fatal signal or a hang killed by the watchdog.
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
# One intra-op thread per rank unless asked otherwise (torchrun's own default; the data loader has its own
# worker processes, --num-workers).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
