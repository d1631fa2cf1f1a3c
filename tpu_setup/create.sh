#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource and wait until it is ACTIVE.
# Run `bash tpu_setup/create.sh --help` for the flags. Sourced by launch.sh and preempt_watch.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CREATE_USAGE="Usage: bash tpu_setup/create.sh --name NAME --zone ZONE --accelerator TYPE [flags]

Creates a queued resource (gcloud compute tpus queued-resources create) for one TPU VM or pod slice
and waits until it is ACTIVE. The runtime version follows the generation of --accelerator:
  v4-N        -> tpu-ubuntu2204-base      v5litepod-N (or v5e-N) -> v2-alpha-tpuv5-lite
  v5p-N       -> v2-alpha-tpuv5           v6e-N                  -> v2-alpha-tpuv6e
If the queued resource exists already and is queued/provisioning/active, it only waits.

Examples:
  bash tpu_setup/create.sh --name p140m --zone us-west4-a --accelerator v5e-8 --spot
  bash tpu_setup/create.sh --name p1b --zone us-east5-a --accelerator v5p-32 --spot --dry-run"

create_flags() {
  section "Slice"
  flag accelerator ACCELERATOR "v5litepod-8" "accelerator type: v4-N, v5litepod-N (alias v5e-N), v5p-N, v6e-N"
  flag runtime-version RUNTIME_VERSION "" "TPU software version (empty: the one for the generation)"
  flag capacity CAPACITY "on-demand" "on-demand | spot | reserved | best-effort (best-effort uses gcloud alpha)"
  alias_flag spot CAPACITY spot "same as --capacity=spot (preemptible; see preempt_watch.sh)"
  alias_flag reserved CAPACITY reserved "same as --capacity=reserved (use your reservation)"
  alias_flag best-effort CAPACITY best-effort "same as --capacity=best-effort"
  alias_flag on-demand CAPACITY on-demand "same as --capacity=on-demand"
  flag network NETWORK "" "VPC network (empty: default)"
  flag subnetwork SUBNETWORK "" "subnetwork (empty: default)"
  flag service-account SERVICE_ACCOUNT "" "service account of the VMs (needs read/write on your buckets)"
  flag valid-until-duration VALID_UNTIL "" "give up queueing after this long, e.g. 6h (empty: never)"
  flag create-extra CREATE_EXTRA "" "extra flags appended to 'queued-resources create' (space-separated)"
  switch wait WAIT 1 "wait until the queued resource is ACTIVE"
  flag wait-timeout WAIT_TIMEOUT 86400 "seconds to wait for ACTIVE before failing (0: forever)"
  flag poll POLL_SECONDS 30 "seconds between state polls"
}

# After parse_flags: the normalised accelerator type and its runtime version.
create_finish() {
  ACCELERATOR=$(normalize_accelerator "$ACCELERATOR")
  if [[ -z "$RUNTIME_VERSION" ]]; then
    RUNTIME_VERSION=$(runtime_version_for "$ACCELERATOR") ||
      die "unknown TPU generation in --accelerator=$ACCELERATOR: pass --runtime-version"
  fi
  case "$CAPACITY" in
    on-demand | spot | reserved | best-effort) ;;
    *) die "--capacity must be on-demand, spot, reserved or best-effort (got '$CAPACITY')" ;;
  esac
}

slice_summary() { # "v5p-32 (16 chips on 4 hosts)"
  local shape hosts
  if shape=$(slice_shape "$ACCELERATOR"); then
    hosts=${shape#* }
    printf '%s (%s chips on %s host%s)\n' "$ACCELERATOR" "${shape% *}" "$hosts" "$([[ $hosts == 1 ]] || echo s)"
  else
    printf '%s\n' "$ACCELERATOR"
  fi
}

describe_slice() { # "v5p-32 (16 chips on 4 hosts), runtime v2-alpha-tpuv5, spot"
  printf '%s, runtime %s, %s\n' "$(slice_summary)" "$RUNTIME_VERSION" "$CAPACITY"
}

create_command() { # the gcloud command line, into the array CREATE_CMD
  CREATE_CMD=(gcloud)
  if [[ "$CAPACITY" == best-effort ]]; then CREATE_CMD+=(alpha); fi
  CREATE_CMD+=(compute tpus queued-resources create "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}"
    --node-id="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION")
  case "$CAPACITY" in
    spot) CREATE_CMD+=(--spot) ;;
    reserved) CREATE_CMD+=(--reserved) ;;
    best-effort) CREATE_CMD+=(--best-effort) ;;
  esac
  if [[ -n "$NETWORK" ]]; then CREATE_CMD+=(--network="$NETWORK"); fi
  if [[ -n "$SUBNETWORK" ]]; then CREATE_CMD+=(--subnetwork="$SUBNETWORK"); fi
  if [[ -n "$SERVICE_ACCOUNT" ]]; then CREATE_CMD+=(--service-account="$SERVICE_ACCOUNT"); fi
  if [[ -n "$VALID_UNTIL" ]]; then CREATE_CMD+=(--valid-until-duration="$VALID_UNTIL"); fi
  if [[ -n "$CREATE_EXTRA" ]]; then
    local extra
    read -r -a extra <<<"$CREATE_EXTRA"
    CREATE_CMD+=("${extra[@]}")
  fi
  CREATE_CMD+=(--quiet)
}

# Wait until ACTIVE; fail on FAILED/SUSPENDED or after WAIT_TIMEOUT seconds.
wait_active() {
  if [[ "$DRY_RUN" == 1 ]]; then
    note "wait until the state is ACTIVE: poll every ${POLL_SECONDS}s, fail on FAILED/SUSPENDED or after ${WAIT_TIMEOUT}s"
    print_qr_state_cmd
    return 0
  fi
  local start=$SECONDS state last=''
  while true; do
    state=$(qr_state)
    if [[ "$state" != "$last" ]]; then
      log "queued resource $QUEUED_RESOURCE: $state"
      last=$state
    fi
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | NOT_FOUND)
        die "queued resource $QUEUED_RESOURCE is $state; see: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$ZONE"
        ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start > WAIT_TIMEOUT)); then
      die "queued resource $QUEUED_RESOURCE still $state after ${WAIT_TIMEOUT}s"
    fi
    sleep "$POLL_SECONDS"
  done
}

# Create the queued resource unless it exists (queued, provisioning or active), then wait.
create_slice() {
  create_command
  note "create $QUEUED_RESOURCE: $(describe_slice) in $ZONE"
  if [[ "$DRY_RUN" == 1 ]]; then
    note "(skipped when the queued resource exists already and is not FAILED/SUSPENDED)"
    run "${CREATE_CMD[@]}"
  else
    local state
    state=$(qr_state)
    case "$state" in
      NOT_FOUND) run "${CREATE_CMD[@]}" ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $QUEUED_RESOURCE exists in state $state: delete it first (bash tpu_setup/delete.sh --name $NAME --zone $ZONE --yes)"
        ;;
      UNKNOWN) die "could not read the state of queued resource $QUEUED_RESOURCE (gcloud error above)" ;;
      *) log "queued resource $QUEUED_RESOURCE exists ($state): not creating it again" ;;
    esac
  fi
  if [[ "$WAIT" == 1 ]]; then wait_active; fi
}

create_main() {
  SCRIPT_USAGE=$CREATE_USAGE
  common_flags
  create_flags
  parse_flags "$@"
  require_zone
  common_finish
  create_finish
  create_slice
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then create_main "$@"; fi
