#!/usr/bin/env bash
# launch/xpk.sh: famjax on TPU slices of a GKE cluster through XPK (pip install xpk), from a Docker image of
# this repository (launch/Dockerfile). XPK runs the image on every host of NUM_SLICES slices, and JobSet
# restarts the whole workload (up to MAX_RESTARTS times) when a host is preempted or the trainer exits non-zero;
# each restart resumes from WORKDIR's newest checkpoint.
#
# Usage: CLUSTER=NAME launch/xpk.sh [--dry-run] COMMAND [ARGS...]
#   build                           docker build -f launch/Dockerfile -t IMAGE . (the working tree, less
#                                   launch/Dockerfile.dockerignore), then docker push IMAGE
#   cluster [XPK_FLAGS...]          xpk cluster create: NUM_SLICES slices of ACCELERATOR (e.g. --spot,
#                                   --reservation=ID, --on-demand)
#   run CONFIG WORKDIR [FLAGS...]   preflight CONFIG, then xpk workload create WORKLOAD running
#                                   python -m famjax.main --distributed --config=CONFIG --workdir=WORKDIR FLAGS
#   list                            xpk workload list
#   delete                          xpk workload delete WORKLOAD
#   help                            this text
#
# Preflight (run): CONFIG must exist in the repository, and python -m famjax.tools.aot compiles its train step
# for one slice's TOPOLOGY (from ACCELERATOR, e.g. v5litepod-16 -> v5e:4x4; needs libtpu here, no TPU); no
# workload is created unless it fits in HBM.
#
# Environment: CLUSTER (required); IMAGE (build, run: e.g. us-docker.pkg.dev/PROJECT/REPO/famjax:TAG);
# WORKLOAD (run, delete: lowercase letters, digits, '-'); ACCELERATOR (v5litepod-16); NUM_SLICES (1);
# MAX_RESTARTS (20); ZONE, PROJECT (passed as --zone, --project when set); MODE (train | eval |
# train_and_eval); XPK_FLAGS (more workload create flags, e.g. "--priority=high"); XPK (the xpk command, xpk);
# TOPOLOGY, SKIP_PREFLIGHT=1, PYTHON as in tpu_vm.sh; DRY_RUN=1 or --dry-run prints each command instead.
#
# WORKDIR should be gs://bucket/path (the image has famjax's gcs extra): the pods share no disk. Exit status 75
# (preempted) and crashes restart the workload (--restart-on-user-code-failure); a user error (exit 2) does
# too, up to MAX_RESTARTS, which is why the preflight checks the config first.
set -euo pipefail

prog=launch/xpk.sh
usage_line="usage: CLUSTER=NAME $prog [--dry-run] build|cluster|run CONFIG WORKDIR [FLAGS...]|list|delete|help"

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

if [[ ${1:-} == --dry-run ]]; then export DRY_RUN=1; shift; fi
cmd=${1:-}
[[ $# -gt 0 ]] && shift
if [[ ${1:-} == --dry-run ]]; then export DRY_RUN=1; shift; fi
case $cmd in
  -h|--help|help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
  build|cluster|run|list|delete) ;;
  "") die "missing command; $usage_line" ;;
  *) die "unknown command '$cmd'; $usage_line" ;;
esac

ACCELERATOR=${ACCELERATOR:-v5litepod-16}
NUM_SLICES=${NUM_SLICES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-20}
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a whole number, got '$MAX_RESTARTS'"
xpk=${XPK:-xpk}
repo=$(repo_root)
need() { [[ -n ${!1:-} ]] || die "set $1 ($2); $usage_line"; }
where=()
[[ -n ${ZONE:-} ]] && where+=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && where+=(--project="$PROJECT")
workload_name() {
  need WORKLOAD "the workload's name, e.g. pg19-base"
  [[ $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#WORKLOAD} -le 40 ]] \
    || die "WORKLOAD '$WORKLOAD': use at most 40 lowercase letters, digits and '-', starting with a letter"
}

case $cmd in
  build)
    need IMAGE "the image to build and push, e.g. us-docker.pkg.dev/PROJECT/REPO/famjax:TAG"
    run docker build -f "$repo/launch/Dockerfile" -t "$IMAGE" "$repo"
    run docker push "$IMAGE"
    ;;
  cluster)
    need CLUSTER "the GKE cluster's name"
    run "$xpk" cluster create --cluster="$CLUSTER" --tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES" \
      "${where[@]}" "$@"
    ;;
  run)
    need CLUSTER "the GKE cluster's name"
    need IMAGE "the image launch/xpk.sh build pushed"
    workload_name
    [[ $# -ge 2 ]] || die "run needs CONFIG and WORKDIR; $usage_line"
    repo_config "$1"
    workdir=$2
    shift 2
    check_workdir "$workdir"
    [[ $workdir == gs://* ]] \
      || info "warning: WORKDIR $workdir is not gs://: every pod must see it at that path (a mounted volume)"
    preflight "$config" "$@"
    command="python -m famjax.main --distributed"
    for a in "--config=$config" "--workdir=$workdir" "--mode=${MODE:-train}" "$@"; do
      command+=" $(printf '%q' "$a")"
    done
    read -ra extra <<<"${XPK_FLAGS:-}"
    run "$xpk" workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --docker-image="$IMAGE" \
      --tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS" \
      --restart-on-user-code-failure "${where[@]}" "${extra[@]}" --command="$command"
    ;;
  list)
    need CLUSTER "the GKE cluster's name"
    run "$xpk" workload list --cluster="$CLUSTER" "${where[@]}" "$@"
    ;;
  delete)
    need CLUSTER "the GKE cluster's name"
    workload_name
    run "$xpk" workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${where[@]}" "$@"
    ;;
esac
