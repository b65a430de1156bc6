#!/usr/bin/env bash
# launch/tpu_vm.sh: famjax on a Cloud TPU VM, one host or a multi-host pod slice, through gcloud: a plain TPU
# VM or a queued resource (spot / best-effort / reserved capacity, granted when available).
#
# Usage: TPU_NAME=NAME ZONE=ZONE launch/tpu_vm.sh [--dry-run] COMMAND [ARGS...]
#   create CONFIG [GCLOUD_FLAGS...]     preflight CONFIG (below), then create the TPU VM (e.g. --spot)
#   qr-create CONFIG [GCLOUD_FLAGS...]  preflight CONFIG, then request a queued resource QUEUED_RESOURCE whose
#                                       node is the TPU VM TPU_NAME (e.g. --spot; --best-effort uses gcloud alpha)
#   qr-wait                             poll the queued resource until ACTIVE (exit 1 when FAILED or SUSPENDED)
#   qr-delete [GCLOUD_FLAGS...]         delete the queued resource and its TPU VM (--force; add --quiet to skip
#                                       the prompt)
#   setup                               copy this repo's committed files (git archive HEAD) to every worker and
#                                       install it there: REPO_DIR/.venv with famjax[gcs] and jax[tpu]
#   train CONFIG WORKDIR [FLAGS...]     run python -m famjax.main --distributed on every worker at once;
#                                       FLAGS go to famjax.main (e.g. --config.train.steps=1000); exits with the
#                                       first failing worker's status: 0 done, 2 user error, 75 preempted
#   ssh [GCLOUD_FLAGS...]               interactive shell on worker 0
#   delete [GCLOUD_FLAGS...]            delete the TPU VM (not for a queued resource's node: use qr-delete)
#   help                                this text
#
# Preflight (create, qr-create): CONFIG must exist, and python -m famjax.tools.aot compiles its train step for
# the slice's TOPOLOGY (derived from ACCELERATOR: v5litepod-16 -> v5e:4x4, v5p-16 -> v5p:2x2x2, v4-16 ->
# v4:2x2x2) on this machine (needs libtpu, no TPU); nothing is created unless it fits in HBM.
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR (v5litepod-8); RUNTIME_VERSION (from ACCELERATOR:
# v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base); QUEUED_RESOURCE (TPU_NAME-qr);
# PROJECT (adds --project); REPO_DIR on the workers (~/famjax); MODE (train | eval | train_and_eval);
# TOPOLOGY (overrides the derived one); SKIP_PREFLIGHT=1 skips the compile check (not the CONFIG check);
# POLL (qr-wait's interval, 30 s), WAIT_TIMEOUT (qr-wait's limit, 0: none); PYTHON (runs the preflight here);
# DRY_RUN=1 or --dry-run prints each command ("+ ...") instead of running it.
#
# WORKDIR: a gs://bucket/path URL, or a path every worker sees at the same place (gcsfuse, Filestore, NFS).
# Rerunning the same train command resumes from the newest checkpoint in WORKDIR; on preemption (SIGTERM) the
# trainer saves one and exits 75. launch/run_until_done.sh does the re-creating and relaunching for you.
set -euo pipefail

prog=launch/tpu_vm.sh
usage_line="usage: TPU_NAME=NAME ZONE=ZONE $prog [--dry-run] create|qr-create CONFIG|qr-wait|qr-delete|setup"
usage_line+="|train CONFIG WORKDIR [FLAGS...]|ssh|delete|help"

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=launch/tpu_lib.sh
source "$(dirname "$0")/tpu_lib.sh"

show_help() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

if [[ ${1:-} == --dry-run ]]; then export DRY_RUN=1; shift; fi
cmd=${1:-}
[[ $# -gt 0 ]] && shift
if [[ ${1:-} == --dry-run ]]; then export DRY_RUN=1; shift; fi
case $cmd in
  -h|--help|help) show_help; exit 0 ;;
  create|qr-create|qr-wait|qr-delete|setup|train|ssh|delete) ;;
  "") die "missing command; $usage_line" ;;
  *) die "unknown command '$cmd'; $usage_line" ;;
esac

tpu_env
check_fakes

# create / qr-create: CONFIG is the first argument unless it looks like a flag, else $CONFIG.
create_config() {
  if [[ $# -gt 0 && $1 != -* ]]; then config=$1; config_given=1
  else config=${CONFIG:-}; config_given=0; fi
  [[ -n $config ]] \
    || die "$cmd needs CONFIG (the config you will train, checked before anything is created); $usage_line"
}

case $cmd in
  create|qr-create)
    create_config "$@"
    ((config_given)) && shift
    repo_config "$config"
    warn_uncommitted "$config"
    preflight "$config"
    if [[ $cmd == create ]]; then vm_create "$@"; else qr_create "$@"; fi
    ;;
  qr-wait)
    [[ $# -eq 0 ]] || die "qr-wait takes no arguments; $usage_line"
    qr_wait || exit 1
    ;;
  qr-delete)
    qr_delete "$@"
    ;;
  setup)
    [[ $# -eq 0 ]] || die "setup takes no arguments; $usage_line"
    tpu_setup
    ;;
  train)
    [[ $# -ge 2 ]] || die "train needs CONFIG and WORKDIR; $usage_line"
    repo_config "$1"
    workdir=$2
    shift 2
    check_workdir "$workdir"
    warn_uncommitted "$config"
    tpu_train "$config" "$workdir" "$@"
    ;;
  ssh)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=0 "$@"
    ;;
  delete)
    vm_delete "$@"
    ;;
esac
