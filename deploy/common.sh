# shellcheck shell=bash
# Sourced by deploy.sh and build_engine.sh: print each command, shell-quoted so that it can be copied and
# compared whole, and run it unless DRY_RUN=1.
DRY_RUN=${DRY_RUN:-}

quoted() {  # the arguments as one shell line, each quoted only where the shell needs it
  local arg words=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
  done
  printf '%s' "${words[*]}"
}
run() {  # print a command, run it unless DRY_RUN
  printf '+ %s\n' "$(quoted "$@")"
  if [ -z "$DRY_RUN" ]; then "$@"; fi
}
fail() { printf 'deploy: %s\n' "$*" >&2; exit 1; }
