#!/usr/bin/env bash
# Install parcae-jax on every worker of a TPU VM / pod slice (ssh --worker=all, with retries).
# Run `bash tpu_setup/install.sh --help` for the flags. Sourced by launch.sh and preempt_watch.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INSTALL_USAGE="Usage: bash tpu_setup/install.sh --name NAME --zone ZONE [--repo-url URL --ref REF] [flags]

Puts the code on every worker and installs it into a virtual environment with pip's '[tpu]' extra:
  * source: with --repo-url, 'git clone' + 'git fetch REF' on each worker (branch, tag or commit; the
    workers need read access to the repository); without it, a tarball of this checkout (tracked and
    untracked files that git does not ignore, so uncommitted edits go too), sent with
    'gcloud compute tpus tpu-vm scp --worker=all';
  * Python: TPU VM images ship Python 3.10 and parcae-jax needs >= 3.11, so the environment is made
    with uv (installed into ~/.local/bin if missing), which fetches the requested Python;
  * pip: 'uv pip install -e REMOTE_DIR[EXTRAS]' plus --pip-extra (gcsfs: Orbax and JAX's compilation
    cache reach gs:// through etils/fsspec, which need it).
Every step is idempotent, and the ssh/scp commands are retried with backoff. It refuses to replace
the code under a training run that is still going (see launch.sh --restart).

Examples:
  bash tpu_setup/install.sh --name p140m --zone us-west4-a
  bash tpu_setup/install.sh --name p1b --zone us-east5-a --repo-url https://github.com/you/parcae-jax --ref v0.1"

install_flags() {
  section "Install"
  flag repo-url REPO_URL "" "git URL to clone on the workers (empty: send a tarball of this checkout)"
  flag ref REF "main" "git branch, tag or commit to check out (with --repo-url)"
  flag tarball TARBALL "${TMPDIR:-/tmp}/parcae-jax-src.tar.gz" "local path of the source tarball (without --repo-url)"
  flag python-version PYTHON_VERSION "3.12" "Python version of the workers' virtual environment"
  flag extras EXTRAS "tpu" "pip extras of parcae-jax to install"
  flag pip-extra PIP_EXTRA "gcsfs" "more pip requirements, space-separated (e.g. 'gcsfs jax[tpu]==0.7.2')"
  switch check-devices CHECK_DEVICES 0 "after installing, list the TPU devices on every worker (TPU must be idle)"
}

# Shared by install.sh and launch.sh: where the code, environment and logs live on the workers.
worker_flags() {
  section "Workers"
  # shellcheck disable=SC2016  # $HOME is expanded on the worker
  flag remote-dir REMOTE_DIR '$HOME/parcae-jax' "code folder on each worker (\$HOME/... or absolute)"
  # shellcheck disable=SC2016
  flag venv VENV '$HOME/parcae-venv' "virtual environment on each worker"
  # shellcheck disable=SC2016
  flag log-dir LOG_DIR '$HOME/logs' "logs, pid and exit-status files on each worker"
  flag worker WORKER "all" "which workers: all, or an index such as 0"
}

# A worker path goes into remote scripts inside double quotes: allow $HOME/... and plain paths only.
check_worker_path() {
  local flag_name=$1 value=$2
  value=${value/#\~\//\$HOME/}
  [[ "$value" =~ ^(\$HOME)?/[A-Za-z0-9_./@+-]+$ ]] ||
    die "--$flag_name must be \$HOME/... or a plain absolute path (got '$2')"
  printf '%s\n' "$value"
}

worker_finish() {
  REMOTE_DIR=$(check_worker_path remote-dir "$REMOTE_DIR")
  VENV=$(check_worker_path venv "$VENV")
  LOG_DIR=$(check_worker_path log-dir "$LOG_DIR")
}

# Bash lines (for remote scripts) that fail when a training run started by launch.sh is still alive.
guard_not_training() {
  cat <<EOF
pidfile="$LOG_DIR/train.pid"
$(remote_running_fn)
if running; then
  echo "\$(hostname): train.py is running (runner pid \$pid): stop it first (launch.sh --restart)" >&2
  exit 1
fi
EOF
}

# Bash function (for remote scripts; needs \$pidfile): is the runner of launch.sh alive? Sets \$pid.
remote_running_fn() {
  cat <<'EOF'
running() { [ -s "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null && grep -qs train.sh "/proc/$pid/cmdline"; }
EOF
}

# The script each worker runs.
install_remote_script() {
  cat <<EOF
set -euo pipefail
export PATH="\$HOME/.local/bin:\$HOME/.cargo/bin:\$PATH"
dir="$REMOTE_DIR"
venv="$VENV"
mkdir -p "$LOG_DIR"
$(guard_not_training)
EOF
  if [[ -n "$REPO_URL" ]]; then
    cat <<EOF
if [ ! -d "\$dir/.git" ]; then
  rm -rf "\$dir"
  git clone --quiet $(shell_quote "$REPO_URL") "\$dir"
fi
git -C "\$dir" fetch --quiet --force origin $(shell_quote "$REF")
git -C "\$dir" checkout --quiet --force FETCH_HEAD
echo "\$(hostname): code at \$(git -C "\$dir" rev-parse --short HEAD)"
EOF
  else
    cat <<EOF
rm -rf "\$dir.new"
mkdir -p "\$dir.new"
tar -xzf "\$HOME/$(basename "$TARBALL")" -C "\$dir.new"
rm -rf "\$dir"
mv "\$dir.new" "\$dir"
echo "\$(hostname): code unpacked into \$dir"
EOF
  fi
  cat <<EOF
if ! command -v uv >/dev/null 2>&1; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi
if [ ! -x "\$venv/bin/python" ]; then uv venv --quiet --python $(shell_quote "$PYTHON_VERSION") "\$venv"; fi
uv pip install --quiet --python "\$venv/bin/python" -e "\${dir}[$EXTRAS]" $(format_cmd "${PIP_EXTRA_WORDS[@]}")
"\$venv/bin/python" -c "import socket, jax, parcae_jax; print(socket.gethostname(), parcae_jax.__name__, jax.__version__)"
EOF
  if [[ "$CHECK_DEVICES" == 1 ]]; then
    cat <<EOF
timeout 600 "\$venv/bin/python" -c "import socket, jax; print(socket.gethostname(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)"
EOF
  fi
}

# Bash script (remote): one line per worker, "PARCAE_STATUS HOST RUNNING PID", "... EXITED RC [preempted]"
# or "... NONE"; then, with TAIL > 0, the end of the host's log.
worker_status_script() {
  local tail=${1:-0}
  cat <<EOF
pidfile="$LOG_DIR/train.pid"
log="$LOG_DIR/train-\$(hostname).log"
$(remote_running_fn)
if running; then
  echo "PARCAE_STATUS \$(hostname) RUNNING \$pid"
elif [ -s "$LOG_DIR/train.exit" ]; then
  note=""
  if tail -n 200 "\$log" 2>/dev/null | grep -q "preempted: checkpoint"; then note=preempted; fi
  echo "PARCAE_STATUS \$(hostname) EXITED \$(cat "$LOG_DIR/train.exit") \$note"
else
  echo "PARCAE_STATUS \$(hostname) NONE"
fi
EOF
  if ((tail > 0)); then
    cat <<EOF
echo "--- \$log (last $tail lines) ---"
tail -n $tail "\$log" 2>/dev/null || echo "(no log yet)"
EOF
  fi
}

# Local tarball of the checkout: tracked + untracked-but-not-ignored files that exist.
make_tarball() {
  local repo
  repo=$(shell_quote "$REPO_ROOT")
  note "pack this checkout ($REPO_ROOT) into $TARBALL"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    run_shell "cd $repo && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e \"\$f\" ] && printf '%s\\0' \"\$f\"; done | tar -czf $(shell_quote "$TARBALL") --null -T -"
  else
    run_shell "tar -C $repo -czf $(shell_quote "$TARBALL") --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ ."
  fi
  if [[ "$DRY_RUN" != 1 ]]; then
    log "tarball: $(du -h "$TARBALL" | cut -f1)"
  fi
}

install_finish() {
  read -r -a PIP_EXTRA_WORDS <<<"$PIP_EXTRA"
  [[ "$EXTRAS" =~ ^[A-Za-z0-9_,-]+$ ]] || die "--extras must look like 'tpu' or 'tpu,dev'"
  [[ "$PYTHON_VERSION" =~ ^[0-9.]+$ ]] || die "--python-version must look like 3.12"
}

install_code() {
  if [[ -z "$REPO_URL" ]]; then
    make_tarball
    note "copy it to every worker"
    run_retry gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$(basename "$TARBALL")" "${GCLOUD_FLAGS[@]}" \
      --worker="$WORKER" --quiet
  fi
  note "install parcae-jax[$EXTRAS] on worker(s) $WORKER of $NAME (source: ${REPO_URL:-tarball}${REPO_URL:+ @ $REF})"
  tpu_ssh "$WORKER" "$(install_remote_script)"
}

install_main() {
  SCRIPT_USAGE=$INSTALL_USAGE
  common_flags
  worker_flags
  install_flags
  parse_flags "$@"
  require_zone
  common_finish
  worker_finish
  install_finish
  install_code
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then install_main "$@"; fi
