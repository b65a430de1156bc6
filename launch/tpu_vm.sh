#!/usr/bin/env bash
# launch/tpu_vm.sh: famjax on a Cloud TPU VM, one host or a multi-host pod slice, through gcloud.
#
# Usage: TPU_NAME=NAME ZONE=ZONE launch/tpu_vm.sh COMMAND [ARGS...]
#   create [GCLOUD_FLAGS...]          create the TPU VM (e.g. --spot)
#   setup                             copy this repo's committed files (git archive HEAD) to every worker and
#                                     install it there: REPO_DIR/.venv with famjax and jax[tpu]
#   train CONFIG WORKDIR [FLAGS...]   run python -m famjax.main --distributed on every worker at once;
#                                     FLAGS go to famjax.main (e.g. --config.train.steps=1000)
#   ssh [GCLOUD_FLAGS...]             interactive shell on worker 0
#   delete [GCLOUD_FLAGS...]          delete the TPU VM
#   help                              this text
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR (v5litepod-8); RUNTIME_VERSION (v2-alpha-tpuv5-lite);
# PROJECT (adds --project); REPO_DIR on the workers (~/famjax); MODE (train | eval | train_and_eval);
# DRY_RUN=1 prints each command ("+ ...") instead of running it.
#
# WORKDIR must be a POSIX path that every worker sees at the same path: a bucket mounted with gcsfuse or a
# Filestore/NFS mount (mount it on all workers first). gs:// URLs are refused. Rerunning the same train
# command resumes from the newest checkpoint in WORKDIR; on preemption (SIGTERM) the trainer saves one.
set -euo pipefail

prog=launch/tpu_vm.sh
usage_line="usage: TPU_NAME=NAME ZONE=ZONE $prog create|setup|train CONFIG WORKDIR [FLAGS...]|ssh|delete|help"

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

show_help() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

# REPO_DIR for the remote shell: a leading ~/ becomes "$HOME"/ (expanded there), the rest is quoted.
remote_path() {
  # shellcheck disable=SC2016  # $HOME is for the remote shell
  case $1 in
    \~) printf '"$HOME"' ;;
    \~/*) printf '"$HOME"/%q' "${1#\~/}" ;;
    *) printf '%q' "$1" ;;
  esac
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
  -h|--help|help) show_help; exit 0 ;;
  create|setup|train|ssh|delete) ;;
  "") die "missing command; $usage_line" ;;
  *) die "unknown command '$cmd'; $usage_line" ;;
esac

[[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME (the TPU VM's name); $usage_line"
[[ -n ${ZONE:-} ]] || die "set ZONE (e.g. us-west4-a); $usage_line"
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
# shellcheck disable=SC2088  # the ~ is expanded on the workers, see remote_path
REPO_DIR=${REPO_DIR:-"~/famjax"}
gflags=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && gflags+=(--project="$PROJECT")
repo=$(cd "$(dirname "$0")/.." && pwd)
rdir=$(remote_path "$REPO_DIR")

case $cmd in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gflags[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME_VERSION" "$@"
    ;;
  setup)
    [[ $# -eq 0 ]] || die "setup takes no arguments; $usage_line"
    if ! git -C "$repo" diff --quiet HEAD 2>/dev/null; then
      echo "$prog: warning: uncommitted changes are not copied (git archive HEAD)" >&2
    fi
    tarball=${TMPDIR:-/tmp}/famjax-$TPU_NAME-$$.tar.gz
    run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":famjax.tar.gz "${gflags[@]}" --worker=all
    run rm -f "$tarball"
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="set -e
mkdir -p $rdir && tar -xzf ~/famjax.tar.gz -C $rdir && rm -f ~/famjax.tar.gz && cd $rdir
python3 -m venv .venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  train)
    [[ $# -ge 2 ]] || die "train needs CONFIG and WORKDIR; $usage_line"
    config=$1 workdir=$2
    shift 2
    check_workdir "$workdir"
    remote="cd $rdir && .venv/bin/python -m famjax.main --distributed"
    for a in "--config=$config" "--workdir=$workdir" "--mode=${MODE:-train}" "$@"; do
      remote+=" $(printf '%q' "$a")"
    done
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="$remote"
    ;;
  ssh)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=0 "$@"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gflags[@]}" "$@"
    ;;
esac
