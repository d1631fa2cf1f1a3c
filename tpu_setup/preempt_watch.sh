#!/usr/bin/env bash
# Keep a training run alive on spot/preemptible TPU capacity: when the queued resource is preempted
# (SUSPENDED/FAILED) or gone, delete it, re-create it, reinstall and relaunch; train.py resumes from
# the last checkpoint in the gs:// workdir. Takes the same flags as launch.sh (see --help).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=SCRIPTDIR/launch.sh
source "$TPU_SETUP_DIR/launch.sh"
# shellcheck source=SCRIPTDIR/delete.sh
source "$TPU_SETUP_DIR/delete.sh"

WATCH_USAGE="Usage: bash tpu_setup/preempt_watch.sh [launch.sh flags: --name --zone --accelerator --spot --config --workdir ...]

Every --watch-interval seconds:
  queued resource ACTIVE     -> look at train.py on worker 0:
      running                        nothing to do
      exited 0                       finished: stop watching (--delete-when-done: delete the slice)
      exited 0 after 'preempted: checkpoint' (SIGTERM from a maintenance event), or never launched
                                     relaunch (launch.sh; --install first when never launched)
      exited 3                       stopped by the loss guardrail: stop watching, report
      exited otherwise (crash)       relaunch, at most --max-relaunches times
  SUSPENDED / FAILED         -> spot capacity was reclaimed: delete.sh, then launch.sh --create
                                (create, wait for ACTIVE, install, launch); at most --max-recreates
  gone (NOT_FOUND)           -> launch.sh --create
  WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, ...  -> wait
Recovery runs launch.sh as a child process, so a failed attempt is retried at the next check
instead of ending the watch. Run it under nohup/tmux/screen on a machine that stays up, e.g.
  nohup bash tpu_setup/preempt_watch.sh --name p1b ... > watch-p1b.log 2>&1 &
(launch.sh --resume-on-preemption launches, then becomes this watcher.)"

# \"RUNNING\", \"EXITED RC [preempted]\", \"NONE\", or \"\" when worker 0 cannot be reached.
worker0_status() {
  local out
  out=$(tpu_ssh 0 "$(worker_status_script 0)" 2>/dev/null || true)
  out=$(printf '%s\n' "$out" | sed -n 's/^PARCAE_STATUS [^ ]* //p' | head -n 1)
  printf '%s\n' "${out% }"
}

# child_launch FLAGS...: launch.sh with these control flags and the user's other arguments.
child_launch() {
  local flags=("$@" --no-resume-on-preemption)
  if bash "$TPU_SETUP_DIR/launch.sh" "${flags[@]}" "${KEEP_ARGS[@]}"; then
    return 0
  fi
  log "launch.sh ${flags[*]} failed; trying again at the next check"
  return 1
}

watch_plan() { # --dry-run: the commands of each kind of round
  note "every ${WATCH_SECONDS}s: the queued resource's state"
  print_qr_state_cmd
  note "when ACTIVE: the state of train.py on worker 0"
  tpu_ssh 0 "$(worker_status_script 0)"
  note "when train.py crashed (at most $MAX_RELAUNCHES times) or stopped after a preemption checkpoint: relaunch it"
  bash "$TPU_SETUP_DIR/launch.sh" --no-create --no-install --no-resume-on-preemption "${KEEP_ARGS[@]}"
  note "when SUSPENDED or FAILED (capacity reclaimed; at most $MAX_RECREATES times): delete, then re-create, reinstall, relaunch"
  delete_queued_resource
  bash "$TPU_SETUP_DIR/launch.sh" --create --no-resume-on-preemption "${KEEP_ARGS[@]}"
  note "when train.py exited 0 without a preemption checkpoint: done$([[ $DELETE_WHEN_DONE == 1 ]] && echo ", then delete the slice")"
}

watch_loop() {
  local recreates=0 relaunches=0 state status last=''
  while true; do
    state=$(qr_state)
    status=''
    if [[ "$state" == ACTIVE ]]; then status=$(worker0_status); fi
    if [[ "$state $status" != "$last" ]]; then
      log "$(date -u +%FT%TZ) $QUEUED_RESOURCE: $state${status:+, train.py on worker 0: $status}"
      last="$state $status"
    fi
    case "$state" in
      ACTIVE)
        case "$status" in
          RUNNING*) ;;
          "EXITED 0")
            log "train.py finished"
            if [[ "$DELETE_WHEN_DONE" == 1 ]]; then delete_queued_resource; fi
            return 0
            ;;
          "EXITED 0 preempted" | "EXITED 143"* | "EXITED 137 preempted")
            log "train.py stopped after a preemption signal: relaunching (it resumes from the last checkpoint)"
            child_launch --no-create --no-install --no-restart || true
            ;;
          "EXITED 3"*)
            log "train.py stopped itself (exit 3: loss guardrail, see the log); not relaunching"
            return 3
            ;;
          EXITED*)
            relaunches=$((relaunches + 1))
            ((relaunches <= MAX_RELAUNCHES)) || die "train.py failed $MAX_RELAUNCHES times; see bash tpu_setup/status.sh"
            log "train.py failed ($status): relaunch $relaunches/$MAX_RELAUNCHES"
            child_launch --no-create --no-install --no-restart || true
            ;;
          NONE)
            log "train.py was never launched on this slice: install and launch"
            child_launch --no-create --install --no-restart || true
            ;;
          *) log "worker 0 did not answer; checking again later" ;;
        esac
        ;;
      SUSPENDED | FAILED | NOT_FOUND)
        recreates=$((recreates + 1))
        ((recreates <= MAX_RECREATES)) || die "re-created the slice $MAX_RECREATES times; giving up"
        log "slice $state (preempted or gone): re-create $recreates/$MAX_RECREATES"
        if [[ "$state" != NOT_FOUND ]]; then delete_queued_resource || true; fi
        child_launch --create --no-restart || true
        ;;
      *) ;; # WAITING_FOR_RESOURCES, PROVISIONING, CREATING, ACCEPTED, SUSPENDING, DELETING: wait
    esac
    sleep "$WATCH_SECONDS"
  done
}

watch_main() {
  launch_parse_all "$WATCH_USAGE" "$@"
  strip_control_flags "$@"
  ASYNC=0
  if [[ "$DRY_RUN" == 1 ]]; then
    watch_plan
  else
    watch_loop
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then watch_main "$@"; fi
