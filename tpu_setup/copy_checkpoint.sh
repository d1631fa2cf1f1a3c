#!/usr/bin/env bash
# Copy one checkpoint step of a run out of its gs:// workdir: to a local folder (then, optionally,
# convert it to the official PyTorch format) or to another bucket. Run with --help for the flags.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COPY_USAGE="Usage: bash tpu_setup/copy_checkpoint.sh --workdir gs://BUCKET/runs/NAME --dest DIR|gs://... [--step N] [--to-torch OUT]

Copies WORKDIR/checkpoints/STEP (default: the latest finished step) to DEST/checkpoints/STEP with
'gcloud storage cp -r', plus WORKDIR/config.json when there is one, so DEST is itself a workdir:
  * training resumes from it (train.py --workdir DEST), and
  * python -m parcae_jax.convert to-torch DEST OUT [--step STEP] writes the official PyTorch folder
    (--to-torch OUT does that here, for a local DEST; it needs the 'torch' extra).

Examples:
  bash tpu_setup/copy_checkpoint.sh --workdir gs://BUCKET/runs/p1b --dest runs/p1b --to-torch export/p1b
  bash tpu_setup/copy_checkpoint.sh --workdir gs://BUCKET/runs/p1b --step 40960 --dest gs://OTHER/p1b"

copy_flags() {
  section "Copy"
  flag workdir WORKDIR "" "run folder holding checkpoints/ (gs://... or local)"
  flag step STEP "" "checkpoint step (empty: the latest finished one)"
  flag dest DEST_DIR "" "destination workdir: a local folder or gs://..."
  flag to-torch TO_TORCH "" "after copying to a local DEST_DIR, convert to the official PyTorch format here"
  flag python PYTHON "python3" "Python with parcae-jax installed, for --to-torch"
  require workdir dest
}

copy_main() {
  SCRIPT_USAGE=$COPY_USAGE
  behaviour_flags
  copy_flags
  parse_flags "$@"
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI"
  fi
  local src=${WORKDIR%/} dest=${DEST_DIR%/}
  if [[ -z "$STEP" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
      note "latest step: the largest all-digit folder listed by"
      run gcloud storage ls "$src/checkpoints/"
      STEP=LATEST
    else
      STEP=$(latest_checkpoint_step "$src")
      [[ -n "$STEP" ]] || die "no finished checkpoint under $src/checkpoints/"
      log "latest checkpoint step: $STEP"
    fi
  fi
  [[ "$STEP" =~ ^[0-9]+$ || "$STEP" == LATEST ]] || die "--step must be a number"
  if [[ -n "$TO_TORCH" && "$dest" == gs://* ]]; then die "--to-torch needs a local --dest"; fi
  note "copy $src/checkpoints/$STEP -> $dest/checkpoints/$STEP"
  if [[ "$dest" != gs://* ]]; then run mkdir -p "$dest/checkpoints"; fi
  local cp=(gcloud storage cp)
  if [[ "$src" != gs://* && "$dest" != gs://* ]]; then cp=(cp); fi
  run_retry "${cp[@]}" -r "$src/checkpoints/$STEP" "$dest/checkpoints/"
  note "the run's config.json (written by train.py at the start of a run; skipped if absent)"
  run "${cp[@]}" "$src/config.json" "$dest/config.json" || log "no $src/config.json: skipped"
  if [[ -n "$TO_TORCH" ]]; then
    local step_flag=()
    if [[ "$STEP" =~ ^[0-9]+$ ]]; then step_flag=(--step "$STEP"); fi
    note "convert to the official PyTorch format"
    run "$PYTHON" -m parcae_jax.convert to-torch "$dest" "$TO_TORCH" "${step_flag[@]}"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then copy_main "$@"; fi
