#!/usr/bin/env bash
# launch/local_processes.sh: N famjax processes on this one machine, joined by jax.distributed on localhost,
# to exercise the multi-host code paths (data sharding, collectives, checkpoints) without a cluster.
#
# Usage: launch/local_processes.sh [--dry-run] N CONFIG WORKDIR [famjax.main flags...]
#   e.g. launch/local_processes.sh 2 configs/passkey_tiny.py runs/mp --config.train.steps=20
# Process I logs to LOG_DIR/process_I.log (LOG_DIR: WORKDIR unless set; set it when WORKDIR is gs://).
# Exits 0 when all N succeed; when one fails, stops the others
# (SIGTERM, then SIGKILL after KILL_AFTER seconds, default 20) and exits with its status.
# Environment: JAX_PLATFORMS (cpu unless set: each process gets 1 CPU device unless XLA_FLAGS says otherwise),
# PYTHON (this repo's .venv/bin/python, else python3), PORT (coordinator port, default a free one),
# MODE (train | eval | train_and_eval), DRY_RUN=1 (or --dry-run) prints the N commands instead of running them.
set -euo pipefail

prog=launch/local_processes.sh
usage="usage: $prog [--dry-run] N CONFIG WORKDIR [famjax.main flags...]"
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

case ${1:-} in -h|--help|help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [[ ${1:-} == --dry-run ]]; then export DRY_RUN=1; shift; fi
[[ $# -ge 3 ]] || die "missing arguments; $usage"
n=$1 config=$2 workdir=$3
shift 3
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'; $usage"
check_config "$config"
check_workdir "$workdir"
logdir=${LOG_DIR:-$workdir}
[[ $logdir != gs://* ]] || die "the process logs need a local folder: set LOG_DIR (WORKDIR $workdir is gs://)"

repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
port=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

command_for() {  # sets cmd to the famjax.main command of process $1 (extra flags after it)
  local id=$1
  shift
  cmd=("$PYTHON" -m famjax.main --distributed --coordinator_address="localhost:$port" --num_processes="$n"
       --process_id="$id" --config="$config" --workdir="$workdir" --mode="${MODE:-train}" "$@")
}

if dry_run; then
  for ((i = 0; i < n; i++)); do
    command_for "$i" "$@"
    printf '+ JAX_PLATFORMS=%q' "$JAX_PLATFORMS"; printf ' %q' "${cmd[@]}"
    printf ' > %q 2>&1 &\n' "$logdir/process_$i.log"
  done
  exit 0
fi

mkdir -p "$logdir"
pids=()
any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
stop_all() {  # SIGTERM to the processes still running, SIGKILL to those left after KILL_AFTER seconds
  local pid t alive=()
  for pid in "${pids[@]}"; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; alive+=("$pid"); fi
  done
  [[ ${#alive[@]} -gt 0 ]] || return 0
  for ((t = 0; t < ${KILL_AFTER:-20}; t++)); do
    any_alive "${alive[@]}" || break
    sleep 1
  done
  kill -KILL "${alive[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ((i = 0; i < n; i++)); do
  command_for "$i" "$@"
  "${cmd[@]}" >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "$prog: $n processes (coordinator localhost:$port); follow with: tail -f $logdir/process_0.log"

left=$n
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    left=$((left - 1))
    if ((rc != 0)); then
      echo "$prog: process $i exited with status $rc; stopping the others. Last lines of $logdir/process_$i.log:" >&2
      tail -n 20 "$logdir/process_$i.log" >&2 || true
      exit "$rc"
    fi
  done
  ((left == 0)) || sleep 1
done
echo "$prog: all $n processes finished; logs in $logdir/process_*.log"
