# shellcheck shell=bash
# Shared by the sbatch scripts of this directory (sourced, not run). Provides:
#   aim_setup CONFIG [overrides]   environment, paths, argument list, layout preflight
#   aim_run_requeueable BUILDER    run the training step: BUILDER is a function that sets the array
#                                  AIM_STEP (the srun command) for the nodes in AIM_NODES; checkpoint
#                                  + requeue on signals; after a crash, a lost node or a hang,
#                                  restart by itself (aim_megatron/training/restarts.py decides)
# Knobs (export before sbatch): AIM_REPO (default: the submit dir), AIM_OUTPUT_DIR (default
# runs/$SLURM_JOB_NAME: resubmitting under the same job name resumes), AIM_PYTHON (python),
# AIM_GPUS_PER_NODE (workers per node; default: the GPUs Slurm allocated, else 1 CPU worker),
# AIM_SRUN_ARGS (extra srun flags, e.g. pyxis --container-image=...), AIM_PREFLIGHT (1: check the
# layout with tools/slurm_layout.py before starting), AIM_AFTER_SUCCESS (a command run in a one-task
# srun step after the training finished with exit 0; the sweep array uses it to collect and fit).
# GPUs are requested at submission (sbatch --gpus-per-node=8 ...), so the scripts also run on
# CPU-only partitions, where any gres request is refused.

aim_workers_per_node() {
  local visible="${CUDA_VISIBLE_DEVICES:-}"
  if [ -n "${AIM_GPUS_PER_NODE:-}" ]; then
    echo "$AIM_GPUS_PER_NODE"
  elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "$visible" ] && [ "$visible" != "NoDevFiles" ]; then
    local commas="${visible//[^,]/}"
    echo "$(( ${#commas} + 1 ))"
  else
    echo 1
  fi
}

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
  # One thread per allocated CPU of a worker: a fixed count oversubscribes small allocations.
  local cpus="${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-1} / AIM_GPUS_PER_NODE ))}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus > 0 ? cpus : 1 ))}"
  export PYTHONUNBUFFERED=1
  # torchrun SIGKILLs its workers this many seconds after forwarding a SIGTERM (default 30;
  # torch >= 2.10 reads it), so a checkpoint gets the time of the partition's GraceTime.
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
    exit 1
  fi
  AIM_CONFIG="$1"
  shift
  AIM_PYTHON="${AIM_PYTHON:-python}"
  AIM_GPUS_PER_NODE="$(aim_workers_per_node)"
  AIM_OUTPUT_DIR="${AIM_OUTPUT_DIR:-runs/$SLURM_JOB_NAME}"
  mkdir -p "$AIM_OUTPUT_DIR"
  # The trainer checkpoints when the stop file appears and writes the marker when it has
  # checkpointed on a signal; both here whatever train.output_dir says.
  export AIM_STOP_FILE="${AIM_STOP_FILE:-$AIM_OUTPUT_DIR/stop_request}"
  export AIM_REQUEUE_MARKER="${AIM_REQUEUE_MARKER:-$AIM_OUTPUT_DIR/requeue.json}"
  # The output directory first, so an explicit train.output_dir=... on the command line wins.
  AIM_ARGS=("train.output_dir=$AIM_OUTPUT_DIR" "$@")
  read -r -a AIM_SRUN_EXTRA <<< "${AIM_SRUN_ARGS:-}"
  # Each rank's record of how it ended, and the restart history (training/restarts.py).
  export AIM_RESTART_DIR="$AIM_OUTPUT_DIR/restarts"
  AIM_NODES="$SLURM_JOB_NUM_NODES"
  aim_env
  echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES" \
       "node(s) x $AIM_GPUS_PER_NODE worker(s): $AIM_CONFIG ${AIM_ARGS[*]}"
  if [ "${AIM_PREFLIGHT:-1}" = 1 ]; then
    srun --nodes=1 --ntasks=1 "${AIM_SRUN_EXTRA[@]}" "$AIM_PYTHON" tools/slurm_layout.py \
      --config "$AIM_CONFIG" --nodes "$SLURM_JOB_NUM_NODES" \
      --gpus-per-node "$AIM_GPUS_PER_NODE" "${AIM_ARGS[@]}"
  fi
}

_aim_on_signal() {
  if [ "$1" = USR1 ]; then
    # The time-limit warning (--signal=B:USR1) reaches only this shell. Signalling the step
    # would kill torchrun (it does not handle SIGUSR1) and SIGTERM to srun makes it SIGKILL the
    # step, so ask through the stop file that every trainer checks after each step.
    AIM_STOP_PENDING=1
    echo "$(date -Is) got SIGUSR1: asking the trainer to checkpoint (${AIM_STOP_FILE:-at its start})"
    if [ -n "${AIM_STOP_FILE:-}" ]; then touch "$AIM_STOP_FILE"; fi
  else
    # Preemption, scancel and scontrol requeue signal the job steps themselves.
    echo "$(date -Is) got SIG$1: the job step got it too; waiting for its checkpoint"
  fi
}

aim_restarts() {  # training/restarts.py begin|decide [flags]: prints a word, then a log line
  local cmd=("$AIM_PYTHON" -m aim_megatron.training.restarts "$@" --state-dir "$AIM_RESTART_DIR"
             --config "$AIM_CONFIG" "${AIM_ARGS[@]}")
  # In a container (AIM_SRUN_ARGS) the package is only inside it: ask through a one-task step.
  if [ "${#AIM_SRUN_EXTRA[@]}" -gt 0 ]; then
    cmd=(srun --nodes=1 --ntasks=1 "${AIM_SRUN_EXTRA[@]}" "${cmd[@]}")
  fi
  "${cmd[@]}" || printf 'stop\naim restarts: the restart decision failed (exit %s)\n' "$?"
}

_aim_down_nodes() {  # nodes of this job that Slurm reports down or not responding, comma-separated
  sinfo -h -N -n "$AIM_NODELIST" -t down,drain,fail,no_respond -o %N 2>/dev/null |
    sort -u | paste -sd, - || true
}

aim_refresh_nodes() {
  # Slurm drops a lost node from the job's NodeList: relaunch on the nodes it still has. (The
  # scripts do not use --no-kill, which would keep the job alive there: on Slurm 22.05 a lost
  # batch node then leaves the job RUNNING without its script, and the step that spanned the lost
  # node keeps its CPUs on the others, so new steps wait "Requested nodes are busy". Without it
  # a node loss is NODE_FAIL, and --requeue makes Slurm requeue the job: measured.)
  local list
  list="$(scontrol show job -o "$SLURM_JOB_ID" | grep -oE '(^|[[:space:]])NodeList=[^[:space:]]+' |
          sed 's/.*NodeList=//')" || true
  [ -n "$list" ] && [ "$list" != "(null)" ] || return 0
  local hosts count
  hosts="$(scontrol show hostnames "$list")"
  count="$(printf '%s\n' "$hosts" | grep -c .)"
  if [ "$count" != "$AIM_NODES" ]; then
    echo "$(date -Is) the job now runs on $count node(s): $list"
  fi
  AIM_NODES="$count"
  AIM_NODELIST="$list"
  export MASTER_ADDR="${hosts%%$'\n'*}"
}

aim_wait_nodes_healthy() {
  # A rank's crash can end the step before Slurm notices that its node is gone (SlurmdTimeout):
  # a relaunch then fails on that node. Probe every node; until Slurm has settled it, wait.
  local deadline=$(( $(date +%s) + ${AIM_NODE_SETTLE_S:-120} ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    aim_refresh_nodes
    if timeout 60 srun --nodes="$AIM_NODES" --ntasks="$AIM_NODES" --ntasks-per-node=1 \
         --nodelist="$AIM_NODELIST" true >/dev/null 2>&1; then
      return 0
    fi
    echo "$(date -Is) a node of $AIM_NODELIST does not answer; waiting for Slurm to settle it"
    sleep 5
  done
  return 1
}

aim_run_requeueable() {
  local build="$1" rc decision word lost left before world
  AIM_NODELIST="$SLURM_JOB_NODELIST"
  # The nodes of the previous start, if Slurm requeued the job: which of them are down now.
  local previous
  previous="$(cat "$AIM_RESTART_DIR/nodes" 2>/dev/null || true)"
  lost=""
  if [ -n "$previous" ] && [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    lost="$(sinfo -h -N -n "$previous" -t down,drain,fail,no_respond -o %N 2>/dev/null |
            sort -u | paste -sd, - || true)"
  fi
  mkdir -p "$AIM_RESTART_DIR"
  echo "$SLURM_JOB_NODELIST" > "$AIM_RESTART_DIR/nodes"
  decision="$(aim_restarts begin --nodes-lost "$lost")"
  echo "$(date -Is) ${decision#*$'\n'}"
  if [ "${decision%%$'\n'*}" = stop ]; then
    trap - USR1 TERM
    return 1
  fi
  while true; do
    rm -f "$AIM_STOP_FILE" "$AIM_REQUEUE_MARKER"
    # A signal during the set-up above: the trainer checkpoints (step 0 or its resume step) at once.
    if [ "${AIM_STOP_PENDING:-0}" = 1 ]; then touch "$AIM_STOP_FILE"; fi
    "$build"
    world="$(( AIM_NODES * AIM_GPUS_PER_NODE ))"
    # Run in the background so the traps fire while waiting (bash defers traps during a
    # foreground command).
    "${AIM_STEP[@]}" &
    AIM_CHILD=$!
    while true; do
      rc=0
      wait "$AIM_CHILD" || rc=$?
      # wait also returns (> 128) when a trapped signal arrives: keep waiting while the step runs.
      kill -0 "$AIM_CHILD" 2>/dev/null || break
    done
    rm -f "$AIM_STOP_FILE"
    lost="" left=0
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ] && [ ! -f "$AIM_REQUEUE_MARKER" ]; then
      # A failure no one announced: which nodes are gone (a crash can beat Slurm's notice)?
      before="$AIM_NODELIST"
      aim_wait_nodes_healthy || true
      lost="$(comm -23 <(scontrol show hostnames "$before" | sort) \
                       <(scontrol show hostnames "$AIM_NODELIST" | sort) | paste -sd, -)"
      lost="${lost:-$(_aim_down_nodes)}"
      left="$AIM_NODES"
    fi
    # The marker (a signal's checkpoint, or the hang watchdog), exit 0, 1, 2 or a crash: the
    # decision reads the ranks' own records, since torchrun and srun report codes of their own.
    decision="$(aim_restarts decide --exit-code "$rc" --nodes-lost "$lost" --nodes-left "$left" \
                --gpus-per-node "$AIM_GPUS_PER_NODE" --world "$world")"
    word="${decision%%$'\n'*}"
    echo "$(date -Is) training step exited with code $rc: ${decision#*$'\n'}"
    case "$word" in
      relaunch)
        echo "$(date -Is) relaunching the training step on $AIM_NODES node(s) ($AIM_NODELIST)"
        continue ;;
      requeue)
        trap - USR1 TERM
        echo "$(date -Is) requeue marker ($(cat "$AIM_REQUEUE_MARKER" 2>/dev/null ||
          echo no marker)): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || true
        return 0 ;;
      done)
        trap - USR1 TERM
        if [ -n "${AIM_AFTER_SUCCESS:-}" ]; then
          # e.g. a sweep's array task: the last run to finish collects the sweep and fits it.
          echo "$(date -Is) running AIM_AFTER_SUCCESS: $AIM_AFTER_SUCCESS"
          srun --nodes=1 --ntasks=1 "${AIM_SRUN_EXTRA[@]}" bash -c "$AIM_AFTER_SUCCESS" ||
            echo "$(date -Is) AIM_AFTER_SUCCESS failed (exit $?); the training itself finished"
        fi
        return 0 ;;
      *)
        trap - USR1 TERM
        return "$(( rc != 0 ? rc : 1 ))" ;;
    esac
  done
}

# Installed when the scripts source this file, so that a signal during set-up is not the shell's
# death (SIGUSR1's default action) but a request the trainer acts on when it starts.
trap '_aim_on_signal USR1' USR1
trap '_aim_on_signal TERM' TERM
