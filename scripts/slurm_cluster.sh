#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for testing the sbatch scripts (needs root and the
# Debian packages slurm-wlm + munge, which scripts/setup.sh installs; nothing is installed here).
#   scripts/slurm_cluster.sh start [--nodes N]   (re)start munge, slurmctld and N slurmd (n1..nN)
#   scripts/slurm_cluster.sh stop                stop the daemons this script started
#   scripts/slurm_cluster.sh status
#   scripts/slurm_cluster.sh lose-node NODE     a node lost: SIGKILL its job processes, stop its
#                                                slurmd; after SlurmdTimeout it is DOWN (NODE_FAIL)
# No systemd: the daemons are started by hand. Everything but /etc/slurm/slurm.conf (where the
# client commands look) lives in AIM_SLURM_STATE (default /var/lib/aim-slurm), wiped on start
# so an old StateSaveLocation cannot stop slurmctld ("CLUSTER NAME MISMATCH").
# Partitions: low (default) and high; a job in high preempts (requeues) jobs in low after
# GraceTime. Requeued jobs wait ~2 min for their BeginTime: `scontrol update jobid=N begintime=now`.
set -euo pipefail

STATE="${AIM_SLURM_STATE:-/var/lib/aim-slurm}"
CONF=/etc/slurm/slurm.conf
GRACE="${AIM_SLURM_GRACE:-30}"     # seconds between preemption's SIGTERM and SIGKILL
KILL_WAIT="${AIM_SLURM_KILL_WAIT:-30}"
# Seconds before a node whose slurmd stopped answering is DOWN and its jobs NODE_FAIL (Slurm's
# default 300 would stall a node-loss test for minutes; too low and a loaded host flaps).
SLURMD_TIMEOUT="${AIM_SLURMD_TIMEOUT:-20}"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

stop_pidfiles() {  # stop the daemons whose pids are in the files "$@": all signalled at once, then waited for
  local f pid pids=""
  for f in "$@"; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; pids="$pids $pid"; fi
  done
  for _ in $(seq 50); do
    local alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    pids="$alive"
    [ -z "$pids" ] && break
    sleep 0.1
  done
  # shellcheck disable=SC2086
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  rm -f "$@"
}

stop() {
  local f pid child
  # Cancel the jobs first: killing the daemons alone leaves slurmstepd and the job's processes.
  if [ -f "$STATE/slurmctld.pid" ] && squeue -h >/dev/null 2>&1; then
    scancel --full --signal=KILL --state=RUNNING "$(squeue -h -o %A | paste -sd, -)" 2>/dev/null || true
    squeue -h -o %A | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 100); do pgrep -x slurmstepd >/dev/null || break; sleep 0.2; done
  fi
  # Steps of an earlier cluster whose daemons are gone (only this test cluster runs Slurm here).
  for pid in $(pgrep -x slurmstepd); do
    for child in $(pgrep -P "$pid"); do kill -9 -- "-$child" "$child" 2>/dev/null || true; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # Job processes whose slurmstepd is already gone (a lost node's survivors, reparented to init):
  # they keep ports (torchrun's store at 20000 + job id) that the next cluster's jobs, numbered
  # from 1 again, would connect to.
  local orphans
  orphans="$(grep -lz "^SLURM_JOB_ID=" /proc/[0-9]*/environ 2>/dev/null | sed 's#/proc/\([0-9]*\)/environ#\1#' |
    grep -vx "$$" | paste -sd' ' || true)"
  # shellcheck disable=SC2086
  if [ -n "$orphans" ]; then kill -9 $orphans 2>/dev/null || true; fi
  stop_pidfiles "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid"
  stop_pidfiles "$STATE/munged.pid"
}

lose_node() {  # node $1 vanishes: its slurmd and every process of its job steps, SIGKILLed at once
  local node="${1:?lose-node NODE}" pid pids=""
  [ -f "$STATE/slurmd.$node.pid" ] || die "no slurmd pid file for $node in $STATE"
  pids="$(cat "$STATE/slurmd.$node.pid")"
  # Its tasks (and batch script) carry SLURMD_NODENAME in their environment, all nodes sharing
  # this one host; their parents are the node's slurmstepds. One grep over /proc: a loop of them
  # took over a minute on a loaded host.
  # Builtins only inside the loop: a fork per process took seconds while the node's job ran on.
  local env task envs key value comm
  mapfile -t envs < <(grep -lzx "SLURMD_NODENAME=$node" /proc/[0-9]*/environ 2>/dev/null || true)
  for env in "${envs[@]}"; do
    task="${env#/proc/}"
    task="${task%/environ}"
    pids="$pids $task"
    pid=""
    while read -r key value; do
      if [ "$key" = PPid: ]; then pid="$value"; break; fi
    done < "/proc/$task/status" 2>/dev/null || true
    comm=""
    if [ -n "$pid" ]; then read -r comm < "/proc/$pid/comm" 2>/dev/null || true; fi
    if [ "$comm" = slurmstepd ]; then pids="$pids $pid"; fi
  done
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
  rm -f "$STATE/slurmd.$node.pid"
  echo "slurm_cluster.sh: $node lost (killed: $pids); DOWN after SlurmdTimeout=$(awk -F= '/^SlurmdTimeout/ {print $2}' "$CONF") s"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (apt-get install munge)"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
}

write_conf() {
  local nodes="$1" host cpus mem k names=""
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9 / '"$nodes"')}' /proc/meminfo)"
  mkdir -p /etc/slurm
  {
    echo "# written by scripts/slurm_cluster.sh; state in $STATE"
    echo "ClusterName=aimlocal"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "SlurmdParameters=config_overrides"   # every node declares all CPUs of the one host
    echo "SchedulerParameters=sched_interval=2,bf_interval=2"
    echo "MinJobAge=600"
    echo "KillWait=$KILL_WAIT"
    echo "SlurmdTimeout=$SLURMD_TIMEOUT"
    echo "PreemptType=preempt/partition_prio"
    echo "PreemptMode=REQUEUE"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmctldPidFile=$STATE/slurmctld.pid"
    echo "SlurmctldLogFile=$STATE/slurmctld.log"
    echo "SlurmdSpoolDir=$STATE/slurmd.%n"
    echo "SlurmdPidFile=$STATE/slurmd.%n.pid"
    echo "SlurmdLogFile=$STATE/slurmd.%n.log"
    for k in $(seq "$nodes"); do
      echo "NodeName=n$k NodeHostname=$host NodeAddr=127.0.0.1 Port=$((6820 + k)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
      names="${names:+$names,}n$k"
    done
    echo "PartitionName=low Nodes=$names Default=YES PriorityTier=1 GraceTime=$GRACE MaxTime=INFINITE State=UP OverSubscribe=NO"
    echo "PartitionName=high Nodes=$names PriorityTier=10 MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$CONF"
}

start() {
  local nodes=1 k
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes="${2:?--nodes N}"; shift 2 ;;
      --nodes=*) nodes="${1#*=}"; shift ;;
      *) die "unknown argument $1" ;;
    esac
  done
  [ "$(id -u)" -eq 0 ] || die "needs root (daemons, /etc/slurm)"
  if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; then
    die "slurm-wlm/munge not installed: run scripts/setup.sh"
  fi
  stop
  rm -rf "$STATE"
  mkdir -p "$STATE/ctld"
  for k in $(seq "$nodes"); do
    mkdir -p "$STATE/slurmd.n$k"
    # Scripts use node names as MASTER_ADDR.
    grep -qE "^127\.0\.0\.1[[:space:]].*[[:space:]]n$k([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 n$k" >> /etc/hosts
  done
  start_munge
  write_conf "$nodes"
  /usr/sbin/slurmctld
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  scontrol ping | grep -q UP || die "slurmctld did not start: $(tail -5 "$STATE/slurmctld.log")"
  for k in $(seq "$nodes"); do /usr/sbin/slurmd -N "n$k"; done
  for _ in $(seq 150); do
    [ "$(sinfo -h -p low -t idle -o '%D' 2>/dev/null || true)" = "$nodes" ] && break
    sleep 0.2
  done
  [ "$(sinfo -h -p low -t idle -o '%D')" = "$nodes" ] \
    || die "nodes not idle: $(sinfo -N 2>&1); see $STATE/slurmd.n1.log"
  echo "slurm_cluster.sh: $nodes node(s) up (partitions low, high); state in $STATE"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop; echo "slurm_cluster.sh: stopped" ;;
  status) scontrol ping; sinfo ;;
  lose-node) shift; lose_node "$@" ;;
  *) echo "usage: $0 start [--nodes N] | stop | status | lose-node NODE" >&2; exit 2 ;;
esac
