#!/usr/bin/env bash
# Status of a run: queued resource state, train.py on every worker, the end of a host's log, the
# latest checkpoint step and metrics line in the workdir. Run `bash tpu_setup/status.sh --help`.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=SCRIPTDIR/install.sh
source "$TPU_SETUP_DIR/install.sh"

STATUS_USAGE="Usage: bash tpu_setup/status.sh --name NAME --zone ZONE [--workdir gs://...] [flags]

Prints:
  1. the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, ...) and
     the TPU node's state and health;
  2. when ACTIVE, one line per worker: RUNNING (runner pid), EXITED (train.py's exit status; marked
     'preempted' when it stopped on SIGTERM after writing a checkpoint) or NONE (never launched);
  3. the last --tail lines of the log of worker --log-worker (process 0 logs the progress lines);
  4. with --workdir: the latest finished checkpoint step (WORKDIR/checkpoints/<step>) and the last
     line of WORKDIR/metrics.jsonl.

Example:
  bash tpu_setup/status.sh --name p1b --zone us-east5-a --workdir gs://BUCKET/runs/p1b"

status_flags() {
  section "Status"
  flag workdir WORKDIR "" "run folder (gs://...) for the checkpoint step and metrics (empty: skip)"
  flag tail TAIL_LINES 30 "log lines to show (0: none)"
  flag log-worker LOG_WORKER 0 "worker whose log is shown (all: every worker)"
}

status_main() {
  SCRIPT_USAGE=$STATUS_USAGE
  common_flags
  worker_flags
  status_flags
  parse_flags "$@"
  require_zone
  common_finish
  worker_finish
  [[ "$TAIL_LINES" =~ ^[0-9]+$ ]] || die "--tail must be a number"
  local state=ACTIVE
  note "queued resource and node state"
  if [[ "$DRY_RUN" == 1 ]]; then
    print_qr_state_cmd
  else
    state=$(qr_state)
    printf 'queued resource %s: %s\n' "$QUEUED_RESOURCE" "$state"
  fi
  if [[ "$state" == ACTIVE ]]; then
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" \
      --format 'table(name.basename(), acceleratorType.basename(), state, health, runtimeVersion)' || true
    note "train.py on every worker"
    tpu_ssh "$WORKER" "$(worker_status_script 0)" | sed 's/^PARCAE_STATUS \([^ ]*\) /\1: /' || true
    if ((TAIL_LINES > 0)); then
      note "end of the log of worker $LOG_WORKER"
      tpu_ssh "$LOG_WORKER" "$(worker_status_script "$TAIL_LINES")" | grep -v '^PARCAE_STATUS ' || true
    fi
  fi
  if [[ -n "$WORKDIR" ]]; then
    note "latest checkpoint in $WORKDIR"
    if [[ "$DRY_RUN" == 1 ]]; then
      run gcloud storage ls "${WORKDIR%/}/checkpoints/"
    else
      local step
      step=$(latest_checkpoint_step "$WORKDIR")
      printf 'latest checkpoint step: %s\n' "${step:-none}"
    fi
    note "last metrics line"
    if [[ "$DRY_RUN" == 1 ]]; then
      run gcloud storage cat "${WORKDIR%/}/metrics.jsonl"
      note "(only its last line is shown)"
    elif [[ "$WORKDIR" == gs://* ]]; then
      gcloud storage cat "${WORKDIR%/}/metrics.jsonl" 2>/dev/null | tail -n 1 || echo "(no metrics.jsonl)"
    else
      tail -n 1 "${WORKDIR%/}/metrics.jsonl" 2>/dev/null || echo "(no metrics.jsonl)"
    fi
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then status_main "$@"; fi
