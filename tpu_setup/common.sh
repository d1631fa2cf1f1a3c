#!/usr/bin/env bash
# Shared helpers for tpu_setup/*.sh (sourced, not run): flag registry and parsing, --help, the `run`
# wrapper (prints the command under --dry-run, else echoes and executes it), retries with backoff,
# and the TPU generation table (accelerator type -> runtime version).
#
# Flags: a script registers each flag with `flag NAME VAR DEFAULT HELP` (or `switch`, `alias_flag`);
# the variable VAR takes, in order of precedence, the command-line value, the environment variable
# PARCAE_<VAR>, then DEFAULT. `--help` prints every flag with its environment variable and its value.

[[ -z "${_TPU_SETUP_COMMON:-}" ]] || return 0 # sourced once, however many scripts source it
_TPU_SETUP_COMMON=1

if [[ -z "${BASH_VERSINFO[0]:-}" ]] || ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu_setup needs bash >= 4.4 (macOS: 'brew install bash', then run 'bash tpu_setup/...')" >&2
  exit 2
fi

TPU_SETUP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_SETUP_DIR/.." && pwd)
export TPU_SETUP_DIR REPO_ROOT

# ---------------------------------------------------------------------------------------------------
# Messages. Under --dry-run the output on stdout is itself a bash script: comments and commands.
# ---------------------------------------------------------------------------------------------------

log() { printf '[tpu_setup] %s\n' "$*" >&2; }
die() {
  printf '[tpu_setup] error: %s\n' "$*" >&2
  exit 1
}
# A step heading: a comment in the dry-run script, a log line otherwise.
note() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '# %s\n' "$*"; else log "$*"; fi
}

# One word, quoted for bash only when it needs it (so printed commands can be pasted back).
shell_quote() {
  local s=$1
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# The command line, every word quoted as needed.
format_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# For log lines: like format_cmd, a multi-line argument (a remote script) shortened to its first line.
format_cmd_short() {
  local out="" word lines
  for word in "$@"; do
    if [[ "$word" == *$'\n'* ]]; then
      lines=$(printf '%s\n' "$word" | wc -l)
      word="${word%%$'\n'*} ...(+$((lines - 1)) lines; --dry-run shows all)"
    fi
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD...: print it (--dry-run) or echo it to stderr and execute it.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "$(format_cmd "$@")"
    return 0
  fi
  log "+ $(format_cmd_short "$@")"
  "$@"
}

# run_retry CMD...: like run, retried up to $RETRIES times, the delay doubling from $RETRY_DELAY
# seconds (at most $RETRY_MAX_DELAY). For idempotent commands only (ssh installs, scp, launches).
run_retry() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '# (retried up to %s times, backoff from %s s)\n' "${RETRIES:-1}" "${RETRY_DELAY:-0}"
    printf '%s\n' "$(format_cmd "$@")"
    return 0
  fi
  local attempt=1 delay=${RETRY_DELAY:-10} max_delay=${RETRY_MAX_DELAY:-300} rc
  while true; do
    log "+ $(format_cmd_short "$@")  [attempt $attempt/${RETRIES:-1}]"
    "$@" && return 0
    rc=$?
    if ((attempt >= ${RETRIES:-1})); then
      log "giving up after $attempt attempts (exit $rc)"
      return "$rc"
    fi
    log "failed (exit $rc); retrying in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2 > max_delay ? max_delay : delay * 2))
    attempt=$((attempt + 1))
  done
}

# run_shell STRING: a shell pipeline, printed under --dry-run, else run with bash -c (pipefail).
run_shell() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$1"
    return 0
  fi
  log "+ $1"
  bash -c "set -euo pipefail; $1"
}

# ---------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------

_FLAG_ORDER=()
declare -A _FLAG_VAR=() _FLAG_KIND=() _FLAG_HELP=() _FLAG_VALUE=() _FLAG_GIVEN=()
PASSTHROUGH=()      # arguments the script forwards (launch.sh: --config.* overrides, anything after --)
PASSTHROUGH_RE=''   # flags matching this regex (without the leading --) go to PASSTHROUGH
SCRIPT_USAGE=''     # text printed by --help above the flag list
REQUIRED_FLAGS=()

_set_default() { # VAR DEFAULT: PARCAE_VAR from the environment wins over DEFAULT
  local env="PARCAE_$1"
  if [[ -n "${!env+x}" ]]; then
    printf -v "$1" '%s' "${!env}"
  else
    printf -v "$1" '%s' "$2"
  fi
}

# section TITLE: a heading in --help.
section() { _FLAG_ORDER+=("@$1"); }

# flag NAME VAR DEFAULT HELP: --NAME VALUE / --NAME=VALUE.
flag() {
  [[ -z "${_FLAG_KIND[$1]+x}" ]] || return 0 # registered already (sourced twice)
  _FLAG_ORDER+=("$1")
  _FLAG_VAR[$1]=$2 _FLAG_KIND[$1]=value _FLAG_HELP[$1]=$4
  _set_default "$2" "$3"
}

# switch NAME VAR DEFAULT HELP: --NAME sets 1, --no-NAME or --NAME=0 sets 0.
switch() {
  [[ -z "${_FLAG_KIND[$1]+x}" ]] || return 0
  _FLAG_ORDER+=("$1")
  _FLAG_VAR[$1]=$2 _FLAG_KIND[$1]=switch _FLAG_HELP[$1]=$4
  _set_default "$2" "$3"
}

# alias_flag NAME VAR VALUE HELP: --NAME is short for setting VAR to VALUE.
alias_flag() {
  [[ -z "${_FLAG_KIND[$1]+x}" ]] || return 0
  _FLAG_ORDER+=("$1")
  _FLAG_VAR[$1]=$2 _FLAG_KIND[$1]=alias _FLAG_VALUE[$1]=$3 _FLAG_HELP[$1]=$4
}

require() { REQUIRED_FLAGS+=("$@"); }

# flag_given NAME: was --NAME set on the command line or through its PARCAE_ variable?
flag_given() {
  local env="PARCAE_${_FLAG_VAR[$1]}"
  [[ -n "${_FLAG_GIVEN[$1]:-}" || -n "${!env+x}" ]]
}

_bool() { # normalise a switch value to 0/1
  case "${1,,}" in
    1 | true | yes | on) echo 1 ;;
    0 | false | no | off | '') echo 0 ;;
    *) die "expected 0/1/true/false, got '$1'" ;;
  esac
}

usage() {
  printf '%s\n' "$SCRIPT_USAGE"
  printf '\nFlags (each also read from the environment variable shown; current value in brackets):\n'
  local name var kind value
  for name in "${_FLAG_ORDER[@]}"; do
    if [[ "$name" == @* ]]; then
      printf '\n  %s\n' "${name#@}"
      continue
    fi
    var=${_FLAG_VAR[$name]} kind=${_FLAG_KIND[$name]}
    case "$kind" in
      value)
        value=${!var}
        printf '    --%s %s\n          %s [env PARCAE_%s; default: %s]\n' "$name" "$var" \
          "${_FLAG_HELP[$name]}" "$var" "${value:-(none)}"
        ;;
      switch)
        printf '    --%s, --no-%s\n          %s [env PARCAE_%s=0|1; default: %s]\n' "$name" "$name" \
          "${_FLAG_HELP[$name]}" "$var" "${!var}"
        ;;
      alias)
        printf '    --%s\n          %s\n' "$name" "${_FLAG_HELP[$name]}"
        ;;
    esac
  done
  printf '\n    -h, --help\n          show this help and exit\n'
}

# parse_flags "$@": set the registered variables; unknown flags are an error unless they match
# PASSTHROUGH_RE; everything after a bare `--` goes to PASSTHROUGH.
parse_flags() {
  local arg name value has_value kind
  while (($#)); do
    arg=$1
    case "$arg" in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        PASSTHROUGH+=("$@")
        break
        ;;
      --*)
        name=${arg#--} has_value=0 value=''
        if [[ "$name" == *=* ]]; then
          value=${name#*=} name=${name%%=*} has_value=1
        fi
        kind=${_FLAG_KIND[$name]:-}
        _FLAG_GIVEN[${name#no-}]=1
        if [[ -z "$kind" && "$name" == no-* && "${_FLAG_KIND[${name#no-}]:-}" == switch ]]; then
          ((has_value == 0)) || die "--$name takes no value"
          printf -v "${_FLAG_VAR[${name#no-}]}" '%s' 0
        elif [[ "$kind" == value ]]; then
          if ((has_value == 0)); then
            (($# >= 2)) || die "--$name needs a value (see --help)"
            value=$2
            shift
          fi
          printf -v "${_FLAG_VAR[$name]}" '%s' "$value"
        elif [[ "$kind" == switch ]]; then
          if ((has_value)); then value=$(_bool "$value"); else value=1; fi
          printf -v "${_FLAG_VAR[$name]}" '%s' "$value"
        elif [[ "$kind" == alias ]]; then
          ((has_value == 0)) || die "--$name takes no value"
          printf -v "${_FLAG_VAR[$name]}" '%s' "${_FLAG_VALUE[$name]}"
        elif [[ -n "$PASSTHROUGH_RE" && "$name" =~ $PASSTHROUGH_RE ]]; then
          PASSTHROUGH+=("$arg")
        else
          die "unknown flag --$name (see --help)"
        fi
        ;;
      *) die "unexpected argument '$arg' (see --help)" ;;
    esac
    shift
  done
  local missing=() var
  for name in "${REQUIRED_FLAGS[@]}"; do
    var=${_FLAG_VAR[$name]}
    [[ -n "${!var}" ]] || missing+=("--$name")
  done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]} (see --help)"
  DRY_RUN=$(_bool "${DRY_RUN:-0}")
}

# ---------------------------------------------------------------------------------------------------
# Flags every script has, and gcloud plumbing
# ---------------------------------------------------------------------------------------------------

common_flags() {
  where_flags
  behaviour_flags
}

where_flags() {
  section "Where"
  flag name NAME "parcae" "TPU VM / pod slice name (the node id)"
  flag queued-resource QUEUED_RESOURCE "" "queued resource id (empty: same as --name)"
  flag zone ZONE "" "zone, e.g. us-east5-a (what a zone offers: gcloud compute tpus accelerator-types list --zone=Z)"
  flag project PROJECT "" "GCP project (empty: gcloud's configured core/project)"
}

behaviour_flags() {
  section "Behaviour"
  switch dry-run DRY_RUN 0 "print the commands instead of running them (never calls gcloud)"
  flag retries RETRIES 5 "attempts for retried commands (ssh, scp)"
  flag retry-delay RETRY_DELAY 10 "first retry delay in seconds (doubles, at most 300)"
}

# After parse_flags: derived settings shared by all scripts.
common_finish() {
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$NAME}
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}

require_zone() { [[ -n "$ZONE" ]] || die "missing --zone (or PARCAE_ZONE)"; }

# tpu_ssh WORKER SCRIPT: run a bash script on one worker or on all of them (retried).
tpu_ssh() {
  run_retry gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --quiet --command "$2"
}

# The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...): NOT_FOUND if it does
# not exist, UNKNOWN if gcloud failed otherwise (network, auth). Never called under --dry-run.
qr_state() {
  local state err
  err=$(mktemp)
  if state=$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" \
    --format 'value(state.state)' 2>"$err"); then
    printf '%s\n' "${state:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    printf 'NOT_FOUND\n'
  else
    log "gcloud could not describe $QUEUED_RESOURCE: $(tail -n 1 "$err")"
    printf 'UNKNOWN\n'
  fi
  rm -f "$err"
}

# Printed under --dry-run wherever the real script polls the state.
print_qr_state_cmd() {
  run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" \
    --format 'value(state.state)'
}

# ---------------------------------------------------------------------------------------------------
# TPU generations
# ---------------------------------------------------------------------------------------------------

# The API accelerator type: v5e-N is accepted as an alias of v5litepod-N.
normalize_accelerator() {
  case "$1" in
    v5e-*) printf 'v5litepod-%s\n' "${1#v5e-}" ;;
    *) printf '%s\n' "$1" ;;
  esac
}

# Runtime (software) version for JAX per generation, from cloud.google.com/tpu/docs/runtimes.
runtime_version_for() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# "CHIPS HOSTS" of a slice. v4/v5p names count TensorCores (2 per chip, 4 chips per host); v5e/v6e
# names count chips (8 on a single host, 4 per host in multi-host slices).
slice_shape() {
  local acc=$1 n=${1##*-}
  [[ "$n" =~ ^[0-9]+$ ]] || return 1
  case "$acc" in
    v4-* | v5p-*) echo "$((n / 2)) $((n <= 8 ? 1 : n / 8))" ;;
    v5litepod-* | v6e-*) echo "$n $((n <= 8 ? 1 : n / 4))" ;;
    *) return 1 ;;
  esac
}

# Largest finished checkpoint step under WORKDIR/checkpoints (gs:// or local); empty if none. Orbax
# writes a step to a temporary folder and renames it when complete, so only digit-only names count.
latest_checkpoint_step() {
  local names=() name best=''
  if [[ "$1" == gs://* ]]; then
    mapfile -t names < <(gcloud storage ls "${1%/}/checkpoints/" 2>/dev/null || true)
  else
    names=("${1%/}"/checkpoints/*/)
  fi
  for name in "${names[@]}"; do
    name=${name%/}
    name=${name##*/}
    if [[ "$name" =~ ^[0-9]+$ ]] && { [[ -z "$best" ]] || ((10#$name > 10#$best)); }; then best=$name; fi
  done
  printf '%s\n' "$best"
}

# gs://bucket/some/path -> gs://bucket
gcs_bucket() {
  local rest=${1#gs://}
  printf 'gs://%s\n' "${rest%%/*}"
}
