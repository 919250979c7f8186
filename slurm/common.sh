# Sourced by the stage scripts (slurm/stage*.sh, slurm/step_jepa.sh) inside their batch job: the launch,
# the rendezvous, and what happens on a stop signal or a failure. Not a job script itself.
#
# Every setting below comes from the environment when set there (`VAR=... sbatch slurm/x.sh`, or
# `sbatch --export=ALL,VAR=...`); the #SBATCH lines of each stage script are the allocation's defaults,
# and sbatch's own options override them (`sbatch --nodes=8 --time=2-00:00:00 slurm/stage2_lm.sh`).
#
#   CROMWELL_DIR     the repository (default: the folder sbatch was run from)
#   PYTHON           the interpreter (default: $CROMWELL_DIR/.venv/bin/python when it exists, else python3)
#   RUN_DIR          run.output_dir: checkpoints, metrics, TensorBoard (default: runs/<job name>/<job id>,
#                    the same folder for a requeued job, which resumes from it)
#   NPROC_PER_NODE   ranks per node (default: the node's allocated GPUs; 1 on a CPU node)
#   RDZV_PORT        the rendezvous port on the first node (default: 20000 + job id % 20000); the
#                    address is always the first node's: a MASTER_ADDR exported from the submitting
#                    shell (sbatch passes the environment on) must not send the ranks elsewhere
#   INIT_FROM        run.init_from: start from another run's checkpoint (a curriculum's previous stage)
#   STOP_GRACE_S     how long the launcher waits for the ranks' checkpoint after a stop signal (default 600)
#   MAX_REQUEUES     how many times a failed job requeues itself (default 3)
#   NCCL_*, GLOO_SOCKET_IFNAME, OMP_NUM_THREADS   passed through; defaults set by slurm/node.sh and the trainer
#
# The ranks are started by torchrun (torch.distributed.run), one per node under srun: it needs only the
# node count, this node's rank and the first node's address, all from the allocation (no hostfile, no
# ssh between nodes, unlike the deepspeed launcher's multi-node mode), and it forwards Slurm's warning
# signal to the ranks and waits for them (--signals-to-handle, --shutdown-timeout), which the deepspeed
# launcher does not. DeepSpeed reads the rank variables torchrun sets, so pretrain/train.py is unchanged.

set -uo pipefail

: "${SLURM_JOB_ID:?slurm/common.sh runs inside a Slurm batch job: submit the stage script with sbatch}"
CROMWELL_DIR=${CROMWELL_DIR:-$SLURM_SUBMIT_DIR}
cd "$CROMWELL_DIR" || exit 1
if [[ ! -f pretrain/train.py ]]; then
    echo "error: $CROMWELL_DIR is not the Cromwell repository: sbatch from its root or set CROMWELL_DIR" >&2
    exit 1
fi
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=$PWD/.venv/bin/python
fi
RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME/$SLURM_JOB_ID}
MAX_REQUEUES=${MAX_REQUEUES:-3}
export PYTHON STOP_GRACE_S=${STOP_GRACE_S:-600}
export MASTER_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The node's address as Slurm reaches it (NodeAddr; the node name itself where none is configured).
MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$first_node}

_stopped_by=
_srun=

# On the warning signal (--signal=B:USR1@N before the time limit, or `scancel --signal=USR1 --batch`
# to preempt), ask every rank to checkpoint and stop, then requeue: srun forwards the signal to
# torchrun on each node, and torchrun to its ranks. SIGTERM (scancel, or Slurm's own preemption,
# which requeues by itself where the cluster's PreemptMode says so) checkpoints the same way but
# never requeues: a job its user cancelled stays cancelled.
_stop() {
    _stopped_by=$1
    echo "[$(date +%FT%T)] job $SLURM_JOB_ID: $1: asking the ranks to checkpoint and stop"
    [[ -n $_srun ]] && kill -"$1" "$_srun" 2>/dev/null
}
trap '_stop USR1' USR1
trap '_stop TERM' TERM

# launch SCRIPT ARGS...: run SCRIPT on every rank of the allocation; on a stop signal or a failure,
# requeue the job, which then resumes from the run's newest complete checkpoint.
launch() {
    local script=$1
    shift
    local sets=(--set "run.output_dir=$RUN_DIR")
    [[ -n ${INIT_FROM:-} ]] && sets+=(--set "run.init_from=$INIT_FROM")
    echo "[$(date +%FT%T)] job $SLURM_JOB_ID (${SLURM_JOB_NAME}), restart ${SLURM_RESTART_COUNT:-0}:" \
         "$SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
    # --resume auto: a requeued job continues from its newest complete checkpoint, a new one starts.
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash slurm/node.sh "$script" "${sets[@]}" --resume auto "$@" &
    _srun=$!
    # `wait` returns early when a trapped signal arrives; wait again until srun itself has ended.
    while kill -0 "$_srun" 2>/dev/null; do wait "$_srun"; done
    wait "$_srun"
    local code=$?
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [[ $_stopped_by == USR1 ]]; then
        _requeue "stopped by USR1 (the ranks' exit: $code)"
    elif [[ -z $_stopped_by ]] && (( code != 0 )) && (( restarts < MAX_REQUEUES )); then
        _requeue "failed with exit code $code (requeue $((restarts + 1)) of $MAX_REQUEUES)"
    fi
    echo "[$(date +%FT%T)] job $SLURM_JOB_ID: finished with exit code $code"
    exit "$code"
}

_requeue() {
    echo "[$(date +%FT%T)] job $SLURM_JOB_ID: $1; requeueing: it resumes from $RUN_DIR/checkpoints"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "error: scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)" >&2
    fi
}
