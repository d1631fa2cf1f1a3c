"""tpu_setup/ end to end against simulated gcloud / uv / python: create, install, launch, preemption,
relaunch, status, copy and delete (no GCP project needed)."""

import os
import signal
import subprocess
import time

from test_tpu_setup import FAKE_CURL, REPO, SETUP, run, write_exe

# ---------------------------------------------------------------------------------------------------
# The whole loop against a simulated TPU API: create, install, launch, preemption, re-create, finish
# ---------------------------------------------------------------------------------------------------

SIM_GCLOUD = """#!/usr/bin/env bash
# A stand-in for gcloud: one simulated TPU slice (its state in $SIM/state, its only worker's home in
# $SIM/home, ssh runs the command there) and gs:// mapped onto $SIM/gcs/.
echo "gcloud $*" | tr '\\n' ' ' >> "$SIM/calls" && echo >> "$SIM/calls"
state="$SIM/state"
gs() { case "$1" in gs://*) printf '%s' "$SIM/gcs/${1#gs://}" ;; *) printf '%s' "$1" ;; esac; }
case "$*" in
  "compute tpus queued-resources describe "*)
    if [ -f "$state" ]; then cat "$state"; else echo "NOT_FOUND" >&2; exit 1; fi ;;
  "compute tpus queued-resources create "*) echo ACTIVE > "$state" ;;
  "compute tpus queued-resources delete "*) rm -f "$state" ;;
  "compute tpus tpu-vm describe "*) echo "sim  v5p-8  READY  HEALTHY  v2-alpha-tpuv5" ;;
  "compute tpus tpu-vm scp "*) cp "$5" "$SIM/home/${6#*:}" ;;
  "compute tpus tpu-vm ssh "*)
    while [ $# -gt 0 ] && [ "$1" != --command ]; do shift; done
    HOME="$SIM/home" exec bash -c "$2" ;;
  "storage ls "*)
    d=$(gs "$3")
    [ -d "$d" ] || exit 1
    for e in "$d"*; do if [ -d "$e" ]; then echo "$3${e##*/}/"; else echo "$3${e##*/}"; fi; done ;;
  "storage cat "*) cat "$(gs "$3")" ;;
  "storage cp "*)
    shift 2
    files=()
    for a in "$@"; do case "$a" in -r | --quiet) ;; *) files+=("$(gs "$a")") ;; esac; done
    case "${files[1]}" in */) mkdir -p "${files[1]}" ;; *) mkdir -p "$(dirname "${files[1]}")" ;; esac
    cp -r "${files[0]}" "${files[1]}" ;;
  *) echo "simulated gcloud: unexpected command: $*" >&2; exit 2 ;;
esac
"""

SIM_UV = """#!/usr/bin/env bash
echo "uv $*" >> "$SIM/calls"
if [ "$1" = venv ]; then d="${@: -1}"; mkdir -p "$d/bin"; cp "$SIM/python" "$d/bin/python"; fi
"""

SIM_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then echo "$(hostname) parcae_jax simulated"; exit 0; fi
echo "FAKE_TRAIN_ARGS $*"
for _ in $(seq 1200); do
  if [ -f "$SIM/finish" ]; then echo "finished"; exit 0; fi
  sleep 0.1
done
exit 1
"""


def test_preempt_watch_end_to_end_simulated(tmp_path):
    sim = tmp_path
    (sim / "home").mkdir()
    bin_dir = sim / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", SIM_GCLOUD)
    write_exe(bin_dir / "uv", SIM_UV)
    write_exe(bin_dir / "curl", FAKE_CURL)
    write_exe(sim / "python", SIM_PYTHON)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PARCAE_", "FAKE_"))}
    e.update(SIM=str(sim), PATH=f"{bin_dir}:{e['PATH']}", TMPDIR=str(sim))
    pidfile = sim / "home" / "logs" / "train.pid"

    def watcher_saw(text, count, timeout=120.0):
        """Wait until the watcher has logged `text` `count` times; return train.py's runner pid."""
        end = time.time() + timeout
        while time.time() < end:
            if watcher.poll() is not None:
                raise AssertionError(f"watcher exited ({watcher.returncode}):\n" + log_path.read_text())
            if log_path.read_text().count(text) >= count:
                return int(pidfile.read_text())
            time.sleep(0.2)
        raise AssertionError(f"watcher did not log {text!r} {count} times:\n" + log_path.read_text())

    log_path = sim / "watch.log"
    with open(log_path, "w") as log:
        watcher = subprocess.Popen(
            ["bash", str(SETUP / "preempt_watch.sh"), "--name", "sim", "--zone", "z",
             "--accelerator", "v5p-8", "--spot", "--config", "configs/tiny.py", "--workdir", "gs://b/runs/sim",
             "--watch-interval", "1", "--poll", "1", "--retry-delay", "1", "--start-wait", "1",
             "--config.train.max_steps=5"],
            stdout=log, stderr=subprocess.STDOUT, env=e, cwd=REPO, start_new_session=True)
    try:
        running = "ACTIVE, train.py on worker 0: RUNNING"
        first = watcher_saw(running, 1)  # NOT_FOUND -> create, install, launch
        (sim / "state").write_text("SUSPENDED\n")  # spot capacity reclaimed: the VMs vanish
        os.killpg(first, signal.SIGKILL)
        second = watcher_saw(running, 2)  # delete, re-create, reinstall, relaunch
        assert second != first
        (sim / "finish").touch()
        assert watcher.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if watcher.poll() is None:
            os.killpg(watcher.pid, signal.SIGKILL)
        if pidfile.exists() and pidfile.read_text().strip():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    calls = (sim / "calls").read_text().splitlines()
    creates = [c for c in calls if c.startswith("gcloud compute tpus queued-resources create")]
    assert len(creates) == 2
    assert all("--spot" in c and "--runtime-version=v2-alpha-tpuv5" in c for c in creates)
    assert sum(c.startswith("gcloud compute tpus queued-resources delete sim") for c in calls) == 1
    assert sum(c.startswith("uv pip install") for c in calls) == 2
    train_log = next((sim / "home" / "logs").glob("train-*.log")).read_text()
    assert train_log.count("FAKE_TRAIN_ARGS train.py --config configs/tiny.py --workdir gs://b/runs/sim "
                           "--config.train.max_steps=5") == 2
    assert "train.py finished" in log_path.read_text()


def test_status_copy_delete_simulated(tmp_path):
    sim = tmp_path
    bin_dir = sim / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", SIM_GCLOUD)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PARCAE_", "FAKE_"))}
    e.update(SIM=str(sim), PATH=f"{bin_dir}:{e['PATH']}", PARCAE_NAME="sim", PARCAE_ZONE="z")
    run_dir = sim / "gcs" / "b" / "runs" / "p"
    for step in ("4", "8", "12.orbax-checkpoint-tmp-99"):  # 12 is unfinished: not a checkpoint yet
        (run_dir / "checkpoints" / step / "state").mkdir(parents=True)
        (run_dir / "checkpoints" / step / "state" / "data").write_text(step)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.5}\n')
    logs = sim / "home" / "logs"
    logs.mkdir(parents=True)
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    (logs / f"train-{host}.log").write_text("".join(f"line {i}\n" for i in range(50)))
    (logs / "train.exit").write_text("0\n")
    (sim / "state").write_text("ACTIVE\n")

    out = run("status.sh", "--workdir", "gs://b/runs/p", "--tail", "5", env=e).stdout
    assert "queued resource sim: ACTIVE" in out
    assert f"{host}: EXITED 0" in out
    assert "line 49" in out and "line 44" not in out
    assert "latest checkpoint step: 8" in out
    assert out.rstrip().endswith('{"step": 2, "loss": 8.5}')

    p = run("copy_checkpoint.sh", "--workdir", "gs://b/runs/p", "--dest", str(sim / "local"), env=e)
    assert "latest checkpoint step: 8" in p.stderr
    assert (sim / "local" / "checkpoints" / "8" / "state" / "data").read_text() == "8"
    assert (sim / "local" / "config.json").exists()
    run("copy_checkpoint.sh", "--workdir", "gs://b/runs/p", "--step", "4", "--dest", "gs://o/p", env=e)
    assert (sim / "gcs" / "o" / "p" / "checkpoints" / "4" / "state" / "data").read_text() == "4"
    run("copy_checkpoint.sh", "--workdir", str(sim / "local"), "--dest", str(sim / "local2"), env=e)
    assert (sim / "local2" / "checkpoints" / "8" / "state" / "data").read_text() == "8"
    p = run("copy_checkpoint.sh", "--workdir", "gs://b/runs/none", "--dest", str(sim / "x"), env=e,
            check=False)
    assert p.returncode != 0 and "no finished checkpoint" in p.stderr

    run("delete.sh", "--yes", env=e)
    assert not (sim / "state").exists()
    calls = (sim / "calls").read_text()
    assert "gcloud compute tpus queued-resources delete sim --zone=z --force --quiet" in calls
