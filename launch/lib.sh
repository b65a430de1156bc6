# launch/lib.sh: helpers shared by the launch/ scripts (sourced after they set $prog; not run on its own).
# shellcheck shell=bash

# A one-line error naming the script ($prog, set by the caller): die for user errors (exit 2), fail for a
# failure that is not the user's input (exit 1). info prints a one-line note on stderr.
# shellcheck disable=SC2154
die() { echo "$prog: $*" >&2; exit 2; }
fail() { echo "$prog: $*" >&2; exit 1; }
info() { echo "$prog: $*" >&2; }

# True when DRY_RUN asks to print commands instead of running them (DRY_RUN=1 or a leading --dry-run).
dry_run() { [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; }

# One shell word, readable: bare when safe, else single-quoted (the printed line can be pasted back).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Runs a command, or with DRY_RUN=1 prints it as "+ cmd args..." (and succeeds).
run() {
  if dry_run; then
    local line="+" a
    for a in "$@"; do line+=" $(quote "$a")"; done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# The workdir: any path every host sees at the same place (gcsfuse / Filestore / NFS / Lustre mount) or a
# gs://bucket/path URL (needs famjax's gcs extra on every host). Only an empty one is refused here.
check_workdir() {
  [[ -n $1 ]] || die "WORKDIR is empty"
}

# The repository root (physical path), from the script's own location.
repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P); }

# The local Python that runs famjax tools here: $PYTHON, else the repository's .venv, else python3.
python_bin() {
  local repo
  repo=$(repo_root)
  if [[ -n ${PYTHON:-} ]]; then printf '%s' "$PYTHON"
  elif [[ -x $repo/.venv/bin/python ]]; then printf '%s' "$repo/.venv/bin/python"
  else printf 'python3'; fi
}

# check_config CONFIG: dies in one line unless the config file exists (here, or under the repository root).
# An ml_collections argument suffix ("configs/x.py:arg") is allowed. Runs in dry runs too.
check_config() {
  local c=$1
  [[ -n $c ]] || die "missing CONFIG (a config file such as configs/pg19_base.py)"
  [[ $c == *.py:* ]] && c=${c%%.py:*}.py
  [[ -f $c || ( $c != /* && -f $(repo_root)/$c ) ]] || die "CONFIG $c: no such file"
}

# repo_config CONFIG: check_config, then sets $config to CONFIG's path relative to the repository, as the
# TPU workers and the image see it (only the repository is copied there); dies when it lies outside.
repo_config() {
  local c=$1 suffix="" abs repo
  check_config "$c"
  repo=$(repo_root)
  if [[ $c == *.py:* ]]; then suffix=:${c#*.py:}; c=${c%%.py:*}.py; fi
  if [[ -f $c ]]; then abs=$(cd "$(dirname "$c")" && pwd -P)/$(basename "$c"); else abs=$repo/$c; fi
  [[ $abs == "$repo"/* ]] || die "CONFIG $c is outside the repository $repo: the workers only get the repository"
  # shellcheck disable=SC2034  # the caller's
  config=${abs#"$repo"/}$suffix
}

# topology_for ACCELERATOR: the famjax.tools.aot topology of a Cloud TPU accelerator type (v5litepod-16 ->
# v5e:4x4, v6e-8 -> v6e:2x4, v5p-16 -> v5p:2x2x2, v4-16 -> v4:2x2x2: v5p and v4 count TensorCores, two per
# chip). Prints nothing (status 1) for a type it does not know.
topology_for() {
  local gen n chips a=1 b=1 c=1
  case $1 in
    v5litepod-*|v5e-*) gen=v5e ;;
    v6e-*) gen=v6e ;;
    v5p-*) gen=v5p ;;
    v4-*) gen=v4 ;;
    *) return 1 ;;
  esac
  n=${1##*-}
  [[ $n =~ ^[1-9][0-9]*$ ]] || return 1
  chips=$n
  if [[ $gen == v5p || $gen == v4 ]]; then
    ((n % 2 == 0)) || return 1
    chips=$((n / 2))
  fi
  ((chips & (chips - 1))) && return 1  # slices are powers of two
  if [[ $gen == v5e || $gen == v6e ]]; then  # 2D: 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16
    while ((a * b < chips)); do if ((a == b)); then b=$((b * 2)); else a=$((a * 2)); fi; done
    printf '%s:%dx%d' "$gen" "$a" "$b"
    return 0
  fi
  # 3D: 2x2x1 (4 chips), 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (the last of the smallest dims doubles)
  if ((chips < 4)); then a=$chips; else a=2 b=2; fi
  while ((a * b * c < chips)); do
    if ((c <= b && c <= a)); then c=$((c * 2)); elif ((b <= a)); then b=$((b * 2)); else a=$((a * 2)); fi
  done
  printf '%s:%dx%dx%d' "$gen" "$a" "$b" "$c"
}

# preflight CONFIG [famjax.main flags...]: before anything is paid for, compiles CONFIG's train step ahead of
# time for the TPU topology (TOPOLOGY, else derived from ACCELERATOR) with python -m famjax.tools.aot (libtpu,
# no TPU needed) and stops when it does not fit in HBM or does not compile. The flags' --config.* overrides
# go to the compile too. SKIP_PREFLIGHT=1 skips it; DRY_RUN prints the command. CONFIG is checked first.
preflight() {
  local cfg=$1 topo a rc=0 over=()
  shift
  check_config "$cfg"
  if [[ ${SKIP_PREFLIGHT:-0} != 0 ]]; then info "preflight skipped (SKIP_PREFLIGHT=1)"; return 0; fi
  topo=${TOPOLOGY:-$(topology_for "${ACCELERATOR:-}")} \
    || die "no TPU topology known for ACCELERATOR=${ACCELERATOR:-}; set TOPOLOGY (e.g. v5p:2x2x2) or SKIP_PREFLIGHT=1"
  for a in "$@"; do [[ $a == --config.* ]] && over+=("$a"); done
  (cd "$(repo_root)" && run "$(python_bin)" -m famjax.tools.aot --config="$cfg" --topology="$topo" "${over[@]}") \
    || rc=$?
  local skip="nothing was created (SKIP_PREFLIGHT=1 skips this check)"
  case $rc in
    0) dry_run || info "preflight: $cfg fits $topo" ;;
    1) fail "preflight: $cfg does not fit in the HBM of $topo (see above); $skip" ;;
    2) die "preflight: famjax.tools.aot refused $cfg for $topo (see above; libtpu: pip install -e '.[tpu]'); $skip" ;;
    *) fail "preflight: famjax.tools.aot --config=$cfg --topology=$topo failed (exit $rc, see above); $skip" ;;
  esac
}

# Test hooks for dry runs only: fake_next VAR pops the first comma-separated value of $VAR into $fake (empty
# when none is left). Setting FAKE_* without DRY_RUN is refused by check_fakes.
fake_next() {
  local -n _list=$1
  local all=${_list:-}
  # shellcheck disable=SC2034  # the caller's
  fake=${all%%,*}
  if [[ $all == *,* ]]; then _list=${all#*,}; else _list=""; fi
}
check_fakes() {
  local v
  for v in FAKE_EXIT_CODES FAKE_STATES; do
    [[ -z ${!v:-} ]] || dry_run || die "$v is a test hook for dry runs only (set DRY_RUN=1)"
  done
}
