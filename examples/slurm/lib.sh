# shellcheck shell=bash
# Shared by the sbatch scripts of this directory (sourced, not run). Provides:
#   aim_setup CONFIG [overrides]   environment, paths, argument list, layout preflight
#   aim_run_requeueable CMD...     run the training step; checkpoint + requeue on USR1/TERM
# Knobs (export before sbatch): AIM_REPO (default: the submit dir), AIM_OUTPUT_DIR (default
# runs/$SLURM_JOB_NAME: resubmitting under the same job name resumes), AIM_PYTHON (python),
# AIM_GPUS_PER_NODE (8), AIM_SRUN_ARGS (extra srun flags, e.g. pyxis --container-image=...),
# AIM_PREFLIGHT (1: check the layout with tools/slurm_layout.py before starting).

aim_env() {
  # Megatron overlaps TP/SP communication with compute only when kernels reach the GPU in issue
  # order, i.e. with a single hardware queue per device.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  # Abort a hung or failed collective instead of idling the allocation; release the memory of
  # asynchronous collectives without recordStream.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Fabric selection (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...) is site-specific: set it outside.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
  export PYTHONUNBUFFERED=1
  # torchrun kills workers 30 s after forwarding SIGTERM; releases with --shutdown-timeout
  # (2026+) read this instead, leaving time for a checkpoint within --signal's 120 s.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"
  # First host of the allocation; no "| head" since with pipefail its SIGPIPE would fail the job.
  local hosts
  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
  export MASTER_ADDR="${hosts%%$'\n'*}"
  export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
}

aim_setup() {
  if [ "$#" -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: sbatch [--nodes=N] <script>.sbatch CONFIG.yaml [section.key=value ...]" >&2
    echo "  (config '${1:-}' not found; paths are relative to AIM_REPO=${AIM_REPO:-?})" >&2
    exit 2
  fi
  AIM_CONFIG="$1"
  shift
  AIM_PYTHON="${AIM_PYTHON:-python}"
  AIM_GPUS_PER_NODE="${AIM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  AIM_OUTPUT_DIR="${AIM_OUTPUT_DIR:-runs/$SLURM_JOB_NAME}"
  # The output directory first, so an explicit train.output_dir=... on the command line wins.
  AIM_ARGS=("train.output_dir=$AIM_OUTPUT_DIR" "$@")
  read -r -a AIM_SRUN_EXTRA <<< "${AIM_SRUN_ARGS:-}"
  aim_env
  echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES" \
       "node(s) x $AIM_GPUS_PER_NODE GPUs: $AIM_CONFIG ${AIM_ARGS[*]}"
  if [ "${AIM_PREFLIGHT:-1}" = 1 ]; then
    srun --nodes=1 --ntasks=1 "${AIM_SRUN_EXTRA[@]}" "$AIM_PYTHON" tools/slurm_layout.py \
      --config "$AIM_CONFIG" --nodes "$SLURM_JOB_NUM_NODES" \
      --gpus-per-node "$AIM_GPUS_PER_NODE" "${AIM_ARGS[@]}"
  fi
}

_aim_on_signal() {
  echo "$(date -Is) got SIG$1: asking the trainer to checkpoint (SIGTERM to the job step)"
  AIM_SIGNALLED=1
  kill -s TERM "$AIM_CHILD" 2>/dev/null || true
}

aim_run_requeueable() {
  # Run in the background so the traps fire while waiting (bash defers traps during a
  # foreground command). srun forwards SIGTERM to every task; the trainer checkpoints and exits 3.
  AIM_SIGNALLED=0
  "$@" &
  AIM_CHILD=$!
  trap '_aim_on_signal USR1' USR1
  trap '_aim_on_signal TERM' TERM
  local rc=0
  while true; do
    rc=0
    wait "$AIM_CHILD" || rc=$?
    # wait also returns (> 128) when a trapped signal arrives: keep waiting while the step runs.
    kill -0 "$AIM_CHILD" 2>/dev/null || break
  done
  trap - USR1 TERM
  # Exit code 3 is the trainer's "checkpointed, requeue me". torchrun reports its own code after a
  # forwarded signal, so a signalled, unfinished step counts as preempted too.
  if [ "$rc" -eq 3 ] || { [ "$AIM_SIGNALLED" -eq 1 ] && [ "$rc" -ne 0 ]; }; then
    echo "$(date -Is) step exited $rc after a checkpoint request: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || true
    return 0
  fi
  echo "$(date -Is) training step exited with code $rc"
  return "$rc"
}
