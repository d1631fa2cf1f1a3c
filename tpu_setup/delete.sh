#!/usr/bin/env bash
# Delete a TPU slice: its queued resource and the TPU VMs in it (checkpoints in gs:// stay).
# Run `bash tpu_setup/delete.sh --help` for the flags. Sourced by preempt_watch.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DELETE_USAGE="Usage: bash tpu_setup/delete.sh --name NAME --zone ZONE [--yes] [flags]

Deletes the queued resource with --force, which deletes its TPU VMs first (whatever its state:
waiting, active, suspended, failed). Anything on the VMs' disks (logs, code) is lost; the run's
checkpoints and metrics live in the gs:// workdir and stay. Asks for confirmation unless --yes.
A running train.py gets no chance to checkpoint: stop it first if the last steps matter
(launch.sh --restart would relaunch it; to stop it, ssh in and 'kill -TERM \$(cat ~/logs/train.pid)').

Example:
  bash tpu_setup/delete.sh --name p1b --zone us-east5-a --yes"

delete_flags() {
  section "Delete"
  switch yes YES 0 "do not ask for confirmation"
  switch async ASYNC 0 "return without waiting for the deletion to finish"
}

delete_queued_resource() {
  local cmd=(gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" --force --quiet)
  if [[ "${ASYNC:-0}" == 1 ]]; then cmd+=(--async); fi
  note "delete queued resource $QUEUED_RESOURCE and its TPU VMs ($NAME)"
  run "${cmd[@]}"
}

delete_main() {
  SCRIPT_USAGE=$DELETE_USAGE
  common_flags
  delete_flags
  parse_flags "$@"
  require_zone
  common_finish
  if [[ "$DRY_RUN" != 1 && "$YES" != 1 ]]; then
    [[ -t 0 ]] || die "not a terminal: pass --yes to delete $QUEUED_RESOURCE without confirmation"
    local answer
    read -r -p "Delete queued resource $QUEUED_RESOURCE (TPU $NAME) in $ZONE? [y/N] " answer
    [[ "$answer" == [yY]* ]] || die "not deleted"
  fi
  delete_queued_resource
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then delete_main "$@"; fi
