# What srun starts once per node (slurm/common.sh's launch): this node's environment, then torchrun,
# which starts the node's ranks and joins the first node's rendezvous.
#   bash slurm/node.sh SCRIPT ARGS...

set -uo pipefail

# The interface that reaches the first node: gloo (CPU) and NCCL's bootstrap bind to it. On the first
# node the route to its own address is the loopback; its interface is the one holding the address.
iface=
if command -v ip >/dev/null; then
    iface=$(ip -o route get "$MASTER_ADDR" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    [[ $iface == lo ]] && iface=$(ip -o addr show to "$MASTER_ADDR" | awk '{print $2; exit}')
fi

if [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]]; then
    nproc=${NPROC_PER_NODE:-$SLURM_GPUS_ON_NODE}
    # The rest of the NCCL environment is the trainer's (pretrain/distributed.py nccl_environment).
    [[ -n $iface ]] && export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$iface}
else
    nproc=${NPROC_PER_NODE:-1}
    [[ -n $iface ]] && export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$iface}
fi
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
export PYTHONUNBUFFERED=1

echo "[$(date +%FT%T)] node $SLURM_NODEID of $SLURM_NNODES ($(hostname)): $nproc rank(s), interface ${iface:-default}"
# torchrun's wait for the ranks after a stop signal is --shutdown-timeout where it has one (torch 2.13); an
# older one (torch 2.11) waits a fixed 30 s before killing them, and a checkpoint still being written then
# is lost (the previous complete one stays, and the requeued job resumes from it).
grace=(--shutdown-timeout="$STOP_GRACE_S")
if ! "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- --shutdown-timeout; then
    grace=()
    echo "[$(date +%FT%T)] warning: this torchrun has no --shutdown-timeout: after a stop signal the ranks have its fixed 30 s to checkpoint, not STOP_GRACE_S=$STOP_GRACE_S"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \
    --nproc-per-node="$nproc" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "${grace[@]}" "$@"
