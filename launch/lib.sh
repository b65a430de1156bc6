# launch/lib.sh: helpers shared by the launch/ scripts (sourced after they set $prog; not run on its own).
# shellcheck shell=bash

# A one-line error naming the script ($prog, set by the caller), exit status 2.
# shellcheck disable=SC2154
die() { echo "$prog: $*" >&2; exit 2; }

# True when DRY_RUN asks to print commands instead of running them.
dry_run() { [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; }

# One shell word, readable: bare when safe, else single-quoted (the printed line can be pasted back).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Runs a command, or with DRY_RUN=1 prints it as "+ cmd args...".
run() {
  if dry_run; then
    local line="+" a
    for a in "$@"; do line+=" $(quote "$a")"; done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# The workdir must be a POSIX path every host sees (checkpoints go through os.path): gs:// is refused.
check_workdir() {
  if [[ $1 == gs://* ]]; then
    die "WORKDIR $1: gs:// URLs are not supported; mount the bucket with gcsfuse on every host and pass the mount path"
  fi
}
