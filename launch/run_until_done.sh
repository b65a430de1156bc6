#!/usr/bin/env bash
# launch/run_until_done.sh: trains CONFIG on a Cloud TPU (queued resource or TPU VM) until the run is done,
# re-creating the TPU after each preemption and relaunching the same command, which resumes from WORKDIR.
#
# Usage: TPU_NAME=NAME ZONE=ZONE launch/run_until_done.sh [--dry-run] CONFIG WORKDIR [famjax.main flags...]
#   e.g. TPU_NAME=fj ZONE=us-east5-a ACCELERATOR=v5p-16 CREATE_FLAGS=--spot \
#          launch/run_until_done.sh configs/paper_1b.py gs://my-bucket/runs/1b
#
# First the preflight (CONFIG exists; its train step compiled for the topology fits in HBM: see tpu_vm.sh),
# then: create the TPU (queued resource: create, wait until ACTIVE), setup, train. Then by the trainer's exit
# status (python -m famjax.main, through gcloud ssh --worker=all):
#   0      the run finished: stop (exit 0)
#   2      user error (config, data, workdir): stop at once (exit 2), restarting cannot help
#   75     preempted (SIGTERM; the step was finished and saved): delete and re-create the TPU, setup, train
#   other  describe the TPU: gone, PREEMPTED or SUSPENDED -> delete, re-create, setup, train; still usable ->
#          relaunch train on it (a crash), but CRASH_LIMIT crashes in a row stop the loop (exit 1)
# Before each restart it waits BACKOFF seconds, doubled after each restart up to BACKOFF_MAX, and back to
# BACKOFF after a launch that trained RESET_AFTER seconds; after MAX_RESTARTS restarts it gives up (exit 1).
# A failed create (no capacity, a FAILED queued resource) or setup counts as a restart too.
# Keep this script running (tmux, screen or a small VM): the workers' processes end with its ssh session.
#
# Environment: TPU_NAME, ZONE (required) and tpu_vm.sh's ACCELERATOR, RUNTIME_VERSION, QUEUED_RESOURCE,
# PROJECT, REPO_DIR, MODE, TOPOLOGY, SKIP_PREFLIGHT, POLL, WAIT_TIMEOUT; RESOURCE (queued | vm, default
# queued); CREATE_FLAGS (create's gcloud flags, e.g. "--spot", "--best-effort", "--reserved"); MAX_RESTARTS
# (20); BACKOFF (60 s); BACKOFF_MAX (1800 s); RESET_AFTER (1800 s); CRASH_LIMIT (3); REUSE=1 (the TPU exists
# and is usable: skip the first create); DELETE_WHEN_DONE=1 (delete the TPU after exit 0);
# DRY_RUN=1 or --dry-run prints the commands; in dry runs FAKE_EXIT_CODES (e.g. "75,0": the trainer's status
# per launch, 0 when none is left) and FAKE_STATES (the describe results, the usable state when none is left)
# simulate preemptions.
set -euo pipefail

prog=launch/run_until_done.sh
usage_line="usage: TPU_NAME=NAME ZONE=ZONE $prog [--dry-run] CONFIG WORKDIR [famjax.main flags...]"

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=launch/tpu_lib.sh
source "$(dirname "$0")/tpu_lib.sh"

case ${1:-} in -h|--help|help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [[ ${1:-} == --dry-run ]]; then export DRY_RUN=1; shift; fi
[[ $# -ge 2 ]] || die "missing CONFIG and WORKDIR; $usage_line"
tpu_env
check_fakes
RESOURCE=${RESOURCE:-queued}
[[ $RESOURCE == queued || $RESOURCE == vm ]] || die "RESOURCE must be queued or vm, got '$RESOURCE'"
for v in MAX_RESTARTS BACKOFF BACKOFF_MAX RESET_AFTER CRASH_LIMIT; do
  [[ -z ${!v:-} || ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
max_restarts=${MAX_RESTARTS:-20} backoff=${BACKOFF:-60} backoff_max=${BACKOFF_MAX:-1800}
reset_after=${RESET_AFTER:-1800} crash_limit=${CRASH_LIMIT:-3}
read -ra create_flags <<<"${CREATE_FLAGS:-}"

repo_config "$1"
workdir=$2
shift 2
check_workdir "$workdir"
warn_uncommitted "$config"
preflight "$config" "$@"

if [[ $RESOURCE == queued ]]; then
  what="queued resource $QUEUED_RESOURCE"
  delete_cmd="launch/tpu_vm.sh qr-delete"
else
  what="TPU VM $TPU_NAME"
  delete_cmd="launch/tpu_vm.sh delete"
fi

create_resource() {
  if [[ $RESOURCE == queued ]]; then qr_create "${create_flags[@]}" && qr_wait
  else vm_create "${create_flags[@]}"; fi
}
delete_resource() {
  if [[ $RESOURCE == queued ]]; then qr_delete --quiet; else vm_delete --quiet; fi
}

restarts=0 delay=$backoff crashes=0 need_create=1 need_setup=1
if [[ ${REUSE:-0} != 0 ]]; then need_create=0; fi

# restart WHY recreate|relaunch|setup: counts the restart (giving up past MAX_RESTARTS), deletes the TPU when
# it is to be re-created, then waits the backoff.
restart() {
  restarts=$((restarts + 1))
  if ((restarts > max_restarts)); then
    fail "$1; giving up after $max_restarts restarts (MAX_RESTARTS); the $what may still exist: $delete_cmd"
  fi
  case $2 in
    recreate) info "$1: re-creating the $what in ${delay}s (restart $restarts of $max_restarts)"
      delete_resource || info "could not delete the $what (it may be gone already)"
      need_create=1 need_setup=1 ;;
    setup) info "$1: setting up again in ${delay}s (restart $restarts of $max_restarts)"; need_setup=1 ;;
    *) info "$1: relaunching on the same TPU in ${delay}s (restart $restarts of $max_restarts)" ;;
  esac
  run sleep "$delay"
  delay=$((delay * 2 > backoff_max ? backoff_max : delay * 2))
}

while :; do
  if ((need_create)); then
    if ! create_resource; then restart "could not get the $what" recreate; continue; fi
    need_create=0
  fi
  if ((need_setup)); then
    if ! tpu_setup; then
      resource_state "$RESOURCE"
      if healthy_state; then restart "setup failed" setup; else restart "setup failed, the TPU is $state" recreate; fi
      continue
    fi
    need_setup=0
  fi
  started=$SECONDS
  rc=0
  tpu_train "$config" "$workdir" "$@" || rc=$?
  if dry_run; then fake_next FAKE_EXIT_CODES; rc=${fake:-0}; fi
  if ((SECONDS - started >= reset_after)); then delay=$backoff crashes=0; fi
  case $rc in
    0)
      info "the run finished (exit 0) after $restarts restarts"
      if [[ ${DELETE_WHEN_DONE:-0} != 0 ]]; then delete_resource
      else info "the $what is still up: $delete_cmd"; fi
      exit 0 ;;
    2)
      die "training stopped with a user error (exit 2, see above): restarting cannot help; fix it and rerun" \
        "(the $what is still up: $delete_cmd)" ;;
    75)
      crashes=0
      restart "training was preempted (exit 75)" recreate ;;
    *)
      resource_state "$RESOURCE"
      if healthy_state; then
        crashes=$((crashes + 1))
        if ((crashes >= crash_limit)); then
          fail "training failed $crashes times in a row (last exit $rc) on a usable TPU ($state): not a" \
            "preemption; see the log above (the $what is still up: $delete_cmd)"
        fi
        restart "training exited $rc on a usable TPU ($state)" relaunch
      else
        crashes=0
        restart "training exited $rc and the TPU is $state" recreate
      fi ;;
  esac
done
