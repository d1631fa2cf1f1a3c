#!/usr/bin/env bash
# Launch train.py on every worker of a TPU VM / pod slice: same config, shared gs:// workdir, a log per
# host. With --create it first creates the slice and installs the code; with --resume-on-preemption it
# then keeps the run alive (preempt_watch.sh). Run `bash tpu_setup/launch.sh --help` for the flags.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=SCRIPTDIR/create.sh
source "$TPU_SETUP_DIR/create.sh"
# shellcheck source=SCRIPTDIR/install.sh
source "$TPU_SETUP_DIR/install.sh"

LAUNCH_USAGE="Usage: bash tpu_setup/launch.sh --name NAME --zone ZONE --config CONFIG --workdir gs://... [--config.KEY=VALUE ...] [-- TRAIN_PY_ARGS]

Starts 'python train.py --config CONFIG --workdir WORKDIR [overrides]' in the background (setsid +
nohup) on every worker, from the code folder, with the environment below. Each host appends to
LOG_DIR/train-\$(hostname).log (and copies it to WORKDIR/logs/ every --log-sync seconds), writes its
runner's pid to LOG_DIR/train.pid and, at the end, train.py's exit status to LOG_DIR/train.exit.
A workdir with a checkpoint resumes by itself, so relaunching the same command continues the run.

On a multi-host slice each process gets --coordinator_address/--num_processes/--process_id, read from
the TPU VM metadata the way jax.distributed does (worker-network-endpoints, agent-worker-number), so
every worker joins one jax.distributed run (--distributed=auto leaves it to train.py instead).

Every '--config.KEY=VALUE' flag, and everything after a bare '--', goes to train.py unchanged.

  --create   first create the slice (create.sh flags) and install the code (install.sh flags)
  --install  first install the code (install.sh flags)
  --resume-on-preemption  after launching, watch the slice and, when spot capacity is reclaimed,
             re-create it, reinstall and relaunch (same as running preempt_watch.sh)

Examples:
  # v5e-8, one host: create + install + launch in one go
  bash tpu_setup/launch.sh --create --spot --name p140m --zone us-west4-a --accelerator v5e-8 \\
      --config configs/parcae_140m.py --workdir gs://BUCKET/runs/p140m \\
      --config.data.source=dir --config.data.dataset_dir=gs://BUCKET/fwe
  # v5p-32 pod (4 hosts), slice already created and installed; print the commands only
  bash tpu_setup/launch.sh --dry-run --name parcae-1b --zone us-east5-a --accelerator v5p-32 \\
      --config configs/parcae_1_3b.py --workdir gs://BUCKET/runs/p1b \\
      --config.data.source=dir --config.data.dataset_dir=gs://BUCKET/fwe"

launch_flags() {
  section "Run"
  flag config CONFIG "" "run config, relative to the code folder (configs/X.py[:arg])"
  flag workdir WORKDIR "" "run folder shared by all hosts: gs://BUCKET/runs/NAME (checkpoints, metrics)"
  switch create CREATE 0 "create the slice and install the code first"
  switch install INSTALL 0 "install the code first"
  switch restart RESTART 0 "stop a running train.py first (SIGTERM: it checkpoints and exits)"
  flag start-wait START_WAIT 5 "seconds after starting before checking that train.py is still alive"
  flag stop-timeout STOP_TIMEOUT 600 "seconds --restart waits for the old run to save and exit before SIGKILL"
  switch resume-on-preemption RESUME_ON_PREEMPTION 0 "then keep the run alive through preemptions (preempt_watch.sh)"
  section "Environment of train.py"
  flag env ENV_VARS "TPU_STDERR_LOG_LEVEL=1" "extra KEY=VALUE pairs, space-separated (e.g. 'LIBTPU_INIT_ARGS=--xla_tpu_x=1')"
  flag compilation-cache COMPILATION_CACHE "auto" "JAX_COMPILATION_CACHE_DIR; auto: gs://BUCKET/jax-compilation-cache of the workdir's bucket; none: off"
  flag distributed DISTRIBUTED "metadata" "multi-host join: metadata (explicit flags from TPU metadata) or auto (train.py detects)"
  flag coordinator-port COORDINATOR_PORT 8476 "port of the jax.distributed coordinator on worker 0"
  section "Preemption watch (--resume-on-preemption, preempt_watch.sh)"
  flag watch-interval WATCH_SECONDS 300 "seconds between checks of the slice and of train.py"
  flag max-recreates MAX_RECREATES 50 "give up after re-creating the slice this many times"
  flag max-relaunches MAX_RELAUNCHES 3 "give up after relaunching a crashed train.py this many times"
  switch delete-when-done DELETE_WHEN_DONE 0 "delete the slice when train.py has finished"
  section "Logs"
  flag gcs-logs GCS_LOGS "auto" "where hosts copy their logs; auto: WORKDIR/logs when the workdir is gs://; none: off"
  flag log-sync LOG_SYNC_SECONDS 300 "seconds between log copies to --gcs-logs"
}

launch_finish() {
  [[ "$CONFIG" != *[[:space:]]* ]] || die "--config must not contain spaces"
  local config_file=${CONFIG%%:*}
  if [[ ! -f "$REPO_ROOT/$config_file" ]]; then
    log "warning: $config_file is not in this checkout ($REPO_ROOT); it must exist in the workers' code folder"
  fi
  if [[ "$WORKDIR" != gs://* ]]; then
    log "warning: --workdir $WORKDIR is not on gs://: hosts of a pod slice do not share local disks"
  fi
  if [[ "$COMPILATION_CACHE" == auto ]]; then
    if [[ "$WORKDIR" == gs://* ]]; then
      COMPILATION_CACHE="$(gcs_bucket "$WORKDIR")/jax-compilation-cache"
    else
      # shellcheck disable=SC2016  # expanded on the worker
      COMPILATION_CACHE='$HOME/.cache/jax-compilation-cache'
    fi
  fi
  if [[ "$GCS_LOGS" == auto ]]; then
    if [[ "$WORKDIR" == gs://* ]]; then GCS_LOGS="${WORKDIR%/}/logs"; else GCS_LOGS=none; fi
  fi
  case "$DISTRIBUTED" in metadata | auto) ;; *) die "--distributed must be metadata or auto" ;; esac
  [[ "$COORDINATOR_PORT" =~ ^[0-9]+$ ]] || die "--coordinator-port must be a number"
  [[ "$LOG_SYNC_SECONDS" =~ ^[0-9]+$ ]] || die "--log-sync must be a number of seconds"
  local n
  for n in START_WAIT STOP_TIMEOUT WATCH_SECONDS MAX_RECREATES MAX_RELAUNCHES; do
    [[ "${!n}" =~ ^[0-9]+$ ]] || die "PARCAE_$n / its flag must be a whole number (got '${!n}')"
  done
  read -r -a ENV_WORDS <<<"$ENV_VARS"
  local kv
  for kv in "${ENV_WORDS[@]}"; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: '$kv' is not KEY=VALUE"
  done
  if ((CREATE)); then INSTALL=1; fi
}

# A value for the runner script: worker paths ($HOME/...) in double quotes, anything else quoted.
worker_value() {
  if [[ "$1" == \$HOME/* ]]; then printf '"%s"' "$1"; else shell_quote "$1"; fi
}

# The script each host runs in the background (written to LOG_DIR/train.sh by the launch script).
runner_script() {
  local kv line
  cat <<EOF
#!/usr/bin/env bash
# Written by tpu_setup/launch.sh: runs train.py on this host and records its exit status.
set -uo pipefail
echo \$\$ > "$LOG_DIR/train.pid"
cd "$REMOTE_DIR" || exit 1
python="$VENV/bin/python"
log="$LOG_DIR/train-\$(hostname).log"
export PYTHONUNBUFFERED=1
EOF
  for kv in "${ENV_WORDS[@]}"; do
    printf 'export %s=%s\n' "${kv%%=*}" "$(shell_quote "${kv#*=}")"
  done
  if [[ "$COMPILATION_CACHE" != none ]]; then
    printf 'export JAX_COMPILATION_CACHE_DIR=%s\n' "$(worker_value "$COMPILATION_CACHE")"
  fi
  printf 'dist=()\n'
  if [[ "$DISTRIBUTED" == metadata ]]; then
    cat <<EOF
# Multi-host: join one jax.distributed run, reading the slice from the TPU VM metadata like JAX does.
md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
endpoints=\$(curl -sf -H "Metadata-Flavor: Google" "\$md/worker-network-endpoints" || true)
worker_id=\$(curl -sf -H "Metadata-Flavor: Google" "\$md/agent-worker-number" || true)
if [ -n "\$endpoints" ] && [ -n "\$worker_id" ]; then
  IFS=, read -r -a hosts <<< "\$endpoints"
  if [ "\${#hosts[@]}" -gt 1 ]; then
    coordinator=\${hosts[0]##*:}
    dist=(--coordinator_address="\$coordinator:$COORDINATOR_PORT" --num_processes="\${#hosts[@]}" --process_id="\$worker_id")
  fi
fi
EOF
  fi
  if [[ "$GCS_LOGS" != none ]]; then
    cat <<EOF
sync_log() { gcloud storage cp --quiet "\$log" $(shell_quote "${GCS_LOGS%/}")/"train-\$(hostname).log" >/dev/null 2>&1 || true; }
(while sleep $LOG_SYNC_SECONDS; do sync_log; done) &
syncer=\$!
EOF
  else
    printf 'sync_log() { :; }\nsyncer=\n'
  fi
  line=$(format_cmd train.py --config "$CONFIG" --workdir "$WORKDIR" "${PASSTHROUGH[@]}")
  cat <<EOF
echo "=== \$(date -u +%FT%TZ) \$(hostname): train.py \${dist[*]} ==="
"\$python" $line "\${dist[@]}" &
child=\$!
trap "kill -TERM \\\$child 2>/dev/null || true" TERM INT
rc=0
wait "\$child" || rc=\$?
while kill -0 "\$child" 2>/dev/null; do rc=0; wait "\$child" || rc=\$?; done
echo "=== \$(date -u +%FT%TZ) \$(hostname): train.py exited with status \$rc ==="
if [ -n "\$syncer" ]; then kill "\$syncer" 2>/dev/null || true; fi
sync_log
echo "\$rc" > "$LOG_DIR/train.exit"
exit "\$rc"
EOF
}

# The script run over ssh on every worker: write the runner, stop/skip a running one, start it.
launch_remote_script() {
  cat <<EOF
set -euo pipefail
mkdir -p "$LOG_DIR"
log="$LOG_DIR/train-\$(hostname).log"
pidfile="$LOG_DIR/train.pid"
$(remote_running_fn)
if running; then
EOF
  if [[ "$RESTART" == 1 ]]; then
    cat <<EOF
  echo "\$(hostname): stopping train.py (runner pid \$pid): SIGTERM, it checkpoints and exits"
  kill -TERM "\$pid"
  for _ in \$(seq 1 $STOP_TIMEOUT); do kill -0 "\$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-\$pid" 2>/dev/null || true
EOF
  else
    cat <<EOF
  echo "\$(hostname): train.py is already running (runner pid \$pid); --restart replaces it"
  exit 0
EOF
  fi
  cat <<EOF
fi
cat > "$LOG_DIR/train.sh" <<\PARCAE_RUNNER
$(runner_script)
PARCAE_RUNNER
rm -f "\$pidfile" "$LOG_DIR/train.exit"
setsid nohup bash "$LOG_DIR/train.sh" >> "\$log" 2>&1 < /dev/null &
for _ in \$(seq 1 20); do [ -s "\$pidfile" ] && break; sleep 0.5; done
sleep $START_WAIT
if running; then
  echo "\$(hostname): train.py started (runner pid \$pid), log \$log"
elif [ "\$(cat "$LOG_DIR/train.exit" 2>/dev/null)" = 0 ]; then
  echo "\$(hostname): train.py ran and exited with status 0 already (nothing left to do?), log \$log"
else
  echo "\$(hostname): train.py did not start or failed at once; end of \$log:" >&2
  tail -n 30 "\$log" >&2
  exit 1
fi
EOF
}

launch_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    note "check that the queued resource is ACTIVE"
    print_qr_state_cmd
  else
    local state
    state=$(qr_state)
    [[ "$state" == ACTIVE ]] ||
      die "queued resource $QUEUED_RESOURCE is $state, not ACTIVE (create it: launch.sh --create, or create.sh)"
  fi
  note "start train.py on worker(s) $WORKER of $NAME: $CONFIG -> $WORKDIR"
  tpu_ssh "$WORKER" "$(launch_remote_script)"
}

launch_hints() {
  local where=(--name "$NAME" --zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then where+=(--project "$PROJECT"); fi
  note "watch:   bash tpu_setup/status.sh $(format_cmd "${where[@]}") --workdir $(shell_quote "$WORKDIR")"
  note "stop:    bash tpu_setup/delete.sh $(format_cmd "${where[@]}")  (the last checkpoint stays in the workdir)"
}

launch_all_flags() {
  common_flags
  worker_flags
  launch_flags
  create_flags
  install_flags
  require config workdir
}

# Parse and finalise every flag launch.sh understands (create, install, launch, common), with `usage`
# as the --help text; shared by launch.sh and preempt_watch.sh.
launch_parse_all() {
  SCRIPT_USAGE=$1
  shift
  PASSTHROUGH_RE='^config\.'
  launch_all_flags
  parse_flags "$@"
  require_zone
  common_finish
  worker_finish
  create_finish
  install_finish
  launch_finish
}

launch_main() {
  local args=("$@")
  launch_parse_all "$LAUNCH_USAGE" "$@"
  if ((CREATE)); then
    note "parcae-jax on $NAME: $(describe_slice) in $ZONE"
  elif flag_given accelerator; then
    note "parcae-jax on $NAME: $(slice_summary) in $ZONE"
  else
    note "parcae-jax on $NAME in $ZONE"
  fi
  if ((CREATE)); then create_slice; fi
  if ((INSTALL)); then install_code; fi
  launch_run
  launch_hints
  if ((RESUME_ON_PREEMPTION)); then
    strip_control_flags "${args[@]}"
    note "keep the run alive through preemptions"
    exec bash "$TPU_SETUP_DIR/preempt_watch.sh" "${KEEP_ARGS[@]}"
  fi
}

# KEEP_ARGS: the arguments without --create/--install/--restart/--resume-on-preemption (before any
# bare --), so preempt_watch.sh can call launch.sh with its own choice of them.
strip_control_flags() {
  KEEP_ARGS=()
  local a rest=0
  for a in "$@"; do
    if ((rest)) || [[ "$a" == -- ]]; then
      rest=1
      KEEP_ARGS+=("$a")
      continue
    fi
    case "$a" in
      --create | --create=* | --no-create | --install | --install=* | --no-install) ;;
      --restart | --restart=* | --no-restart) ;;
      --resume-on-preemption | --resume-on-preemption=* | --no-resume-on-preemption) ;;
      *) KEEP_ARGS+=("$a") ;;
    esac
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then launch_main "$@"; fi
