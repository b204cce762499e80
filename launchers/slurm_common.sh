#!/usr/bin/env bash
# Sourced by launchers/slurm_*.sbatch inside a Slurm batch job (after `cd "$SLURM_SUBMIT_DIR"`, the repo root).
# Sets PY (interpreter), PER_NODE (workers per node), HEAD (first node), PORT, and defines run_requeueable.
#
# Environment knobs (sbatch passes the submitting shell's environment on):
#   PYTHON=/path/python   interpreter (default: the repo's .venv/bin/python, else python3)
#   WORKERS_PER_NODE=K    workers per node (default: the GPUs allocated per node, --gpus-per-node; 1 without GPUs)
#   NIC=eth0              network interface for gloo/NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME; Horovod's
#                         --network-interface); on datkit's emulated hosts it is <prefix>eth, e.g. dkseth
#   MASTER_PORT=29500     rendezvous / master port on the first node
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || command -v python3)}"
gpus="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
gpus="${gpus##*:}"   # "gpu:2" -> 2
PER_NODE="${WORKERS_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] 2>/dev/null && echo "$gpus" || echo 1)}"
HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
PORT="${MASTER_PORT:-29500}"
if [ -n "${NIC:-}" ]; then export GLOO_SOCKET_IFNAME="$NIC" NCCL_SOCKET_IFNAME="$NIC"; fi
export PYTHONUNBUFFERED=1

# run_requeueable MODE CMD...: run the launcher CMD; on SIGUSR1 (#SBATCH --signal=B:USR1@T: T seconds before the
# time limit, or `scancel --batch --signal=USR1 JOB`) send SIGTERM to it -- MODE steps: to the job's srun steps
# (every process in them: launchers and workers), MODE child: to CMD itself (horovodrun, which SIGTERMs its
# workers) -- so every worker finishes its step and rank 0 writes checkpoint_last.pt; then, or when CMD exits 75
# (datkit's "checkpointed, run me again"), requeue the job: it starts again with train.resume=true.
run_requeueable() {
  local mode="$1" rc=0; shift
  PREEMPTED=0
  "$@" &
  LAUNCHER_PID=$!
  trap 'PREEMPTED=1; echo "datkit: SIGUSR1: stopping the job step for a requeue" >&2
        if [ "$mode" = steps ]; then scancel --signal=TERM "$SLURM_JOB_ID"; else kill -TERM "$LAUNCHER_PID"; fi' USR1
  while :; do  # a trapped signal interrupts wait: wait again until the launcher is gone
    rc=0; wait "$LAUNCHER_PID" || rc=$?
    kill -0 "$LAUNCHER_PID" 2>/dev/null || break
  done
  trap - USR1
  # requeue: the workers checkpointed (75), or the signal stopped a launcher that did not finish (a torchrun agent
  # exits 1 when its workers exit 75); a run that finished anyway (exit 0: the signal came in its final evaluation) is done
  if [ "$rc" = 75 ] || { [ "$PREEMPTED" = 1 ] && [ "$rc" != 0 ]; }; then
    echo "datkit: requeueing job $SLURM_JOB_ID (launcher exit $rc, signal $PREEMPTED)" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}
