# launch/tpu_lib.sh: the Cloud TPU steps (gcloud) shared by tpu_vm.sh and run_until_done.sh; sourced after
# lib.sh, not run on its own. Runtime failures return a non-zero status (the restart loop retries them);
# only bad settings die.
# shellcheck shell=bash disable=SC2154  # usage_line is set by the caller

# tpu_env: checks TPU_NAME and ZONE and sets the defaults: ACCELERATOR (v5litepod-8), RUNTIME_VERSION (from
# the accelerator), QUEUED_RESOURCE (TPU_NAME-qr), REPO_DIR (~/famjax), and gflags, repo, rdir.
tpu_env() {
  [[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME (the TPU VM's name); $usage_line"
  [[ -n ${ZONE:-} ]] || die "set ZONE (e.g. us-west4-a); $usage_line"
  ACCELERATOR=${ACCELERATOR:-v5litepod-8}
  if [[ -z ${RUNTIME_VERSION:-} ]]; then
    case $ACCELERATOR in
      v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      *) die "no default RUNTIME_VERSION for ACCELERATOR=$ACCELERATOR; set RUNTIME_VERSION" ;;
    esac
  fi
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}
  # shellcheck disable=SC2088  # the ~ is expanded on the workers, see remote_path
  REPO_DIR=${REPO_DIR:-"~/famjax"}
  gflags=(--zone="$ZONE")
  [[ -n ${PROJECT:-} ]] && gflags+=(--project="$PROJECT")
  repo=$(repo_root)
  rdir=$(remote_path "$REPO_DIR")
}

# REPO_DIR for the remote shell: a leading ~/ becomes "$HOME"/ (expanded there), the rest is quoted.
remote_path() {
  # shellcheck disable=SC2016  # $HOME is for the remote shell
  case $1 in
    \~) printf '"$HOME"' ;;
    \~/*) printf '"$HOME"/%q' "${1#\~/}" ;;
    *) printf '%q' "$1" ;;
  esac
}

# A plain TPU VM: created at once (or refused: no capacity), deleted without a prompt.
vm_create() { run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gflags[@]}" --accelerator-type="$ACCELERATOR" \
  --version="$RUNTIME_VERSION" "$@"; }
vm_delete() { run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gflags[@]}" "$@"; }

# A queued resource: the request waits for capacity (qr_wait), its node is the TPU VM $TPU_NAME. --best-effort
# exists only in gcloud's alpha track.
qr_create() {
  local track=()
  [[ " $* " == *" --best-effort "* ]] && track=(alpha)
  run gcloud "${track[@]}" compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
    "${gflags[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" "$@"
}
qr_delete() { run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${gflags[@]}" --force "$@"; }

# resource_state vm|queued: sets $state to the TPU VM's state (READY when usable) or the queued resource's
# (ACTIVE when usable); NOT_FOUND when gcloud cannot describe it. Dry runs print the command and take the state
# from FAKE_STATES (comma-separated, one per call; the usable state once it is empty).
resource_state() {
  local kind=tpu-vm name=$TPU_NAME field=state healthy=READY
  if [[ $1 == queued ]]; then kind=queued-resources name=$QUEUED_RESOURCE field=state.state healthy=ACTIVE; fi
  if dry_run; then
    run gcloud compute tpus "$kind" describe "$name" "${gflags[@]}" --format="value($field)"
    fake_next FAKE_STATES
    state=${fake:-$healthy}
    return 0
  fi
  state=$(gcloud compute tpus "$kind" describe "$name" "${gflags[@]}" --format="value($field)") || state=NOT_FOUND
  state=${state:-UNKNOWN}
}
healthy_state() { [[ $state == READY || $state == ACTIVE ]]; }

# qr_wait: polls the queued resource every POLL seconds (30) until it is ACTIVE; status 1 when it is FAILED,
# SUSPENDED (its spot node was preempted), being deleted or gone, or WAIT_TIMEOUT seconds (0: none) have passed.
qr_wait() {
  local waited=0 poll=${POLL:-30} last=""
  while :; do
    resource_state queued
    case $state in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING|NOT_FOUND)
        info "queued resource $QUEUED_RESOURCE is $state: no TPU" \
          "(gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$ZONE tells why)"
        return 1 ;;
    esac
    if ((${WAIT_TIMEOUT:-0} > 0 && waited >= WAIT_TIMEOUT)); then
      info "queued resource $QUEUED_RESOURCE still $state after ${waited}s (WAIT_TIMEOUT)"
      return 1
    fi
    [[ $state == "$last" ]] || info "queued resource $QUEUED_RESOURCE is $state; waiting for ACTIVE"
    last=$state
    run sleep "$poll"
    waited=$((waited + poll))
  done
}

# tpu_setup: copies the repository's HEAD (git archive) to every worker and installs it in REPO_DIR/.venv with
# the gcs extra (gs:// workdirs) and jax[tpu].
tpu_setup() {
  local tarball rc=0
  if ! git -C "$repo" diff --quiet HEAD 2>/dev/null; then
    info "warning: uncommitted changes are not copied (git archive HEAD)"
  fi
  tarball=${TMPDIR:-/tmp}/famjax-$TPU_NAME-$$.tar.gz
  run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD || return
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":famjax.tar.gz "${gflags[@]}" --worker=all || rc=$?
  run rm -f "$tarball"
  ((rc == 0)) || return "$rc"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="set -e
mkdir -p $rdir && tar -xzf ~/famjax.tar.gz -C $rdir && rm -f ~/famjax.tar.gz && cd $rdir
python3 -m venv .venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'"
}

# tpu_train CONFIG WORKDIR [famjax.main flags...]: python -m famjax.main --distributed on every worker; returns
# gcloud's status, which is the first failing worker's exit status (0 done, 2 user error, 75 preempted) or 255
# when ssh itself failed. A trainer left running by an earlier launch (its ssh session lost) gets SIGTERM (it
# saves a checkpoint) and up to 120 s to exit before the new one starts on the same chips.
tpu_train() {
  local config=$1 workdir=$2 a remote stop_old
  shift 2
  # shellcheck disable=SC2016  # for the remote shell
  stop_old='p=$(cat .famjax_train.pid 2>/dev/null) && grep -qs famjax.main /proc/"$p"/cmdline && {'\
' echo "stopping the previous trainer (pid $p)" >&2; kill -TERM "$p"; i=0;'\
' while kill -0 "$p" 2>/dev/null && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done; kill -KILL "$p" 2>/dev/null; }'
  remote="cd $rdir || exit 1; $stop_old; echo \$\$ > .famjax_train.pid; exec .venv/bin/python -m famjax.main --distributed"
  for a in "--config=$config" "--workdir=$workdir" "--mode=${MODE:-train}" "$@"; do
    remote+=" $(printf '%q' "$a")"
  done
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="$remote"
}

# warn_uncommitted CONFIG: setup copies the committed files only.
warn_uncommitted() {
  local c=${1%%:*}
  git -C "$repo" ls-files --error-unmatch -- "$c" >/dev/null 2>&1 \
    || info "warning: $c is not committed: setup copies git HEAD only, so the workers will not have it"
}
