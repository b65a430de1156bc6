"""launch/ scripts: syntax and dry runs (no gcloud, no network). The real 2-process run of local_processes.sh is
test_train_multiprocess.py::test_two_processes_match_one (it also checks the losses)."""
import glob
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")) + glob.glob(os.path.join(REPO, "launch", "*.sbatch")))


def sh(script, *args, env=None, timeout=60):
    """Runs `bash launch/SCRIPT args` from the repo root with extra env (TPU_NAME etc. cleared first)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("TPU_NAME", "ZONE", "PROJECT", "DRY_RUN", "CONFIG", "WORKDIR", "MODE", "PORT")}
    base.update(env or {})
    return subprocess.run(["bash", os.path.join("launch", script), *args], cwd=REPO, env=base, text=True,
                          capture_output=True, timeout=timeout)


TPU = {"TPU_NAME": "t1", "ZONE": "us-west4-a", "DRY_RUN": "1"}


def test_scripts_exist_and_parse():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"tpu_vm.sh", "slurm_gpu.sbatch", "local_processes.sh"} <= names
    for s in SCRIPTS:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)
        if s.endswith(".sh"):
            assert os.access(s, os.X_OK), s


def test_tpu_train_dry_run():
    r = sh("tpu_vm.sh", "train", "configs/pg19_base.py", "/mnt/x", "--config.train.steps=5", env=TPU)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("+ gcloud compute tpus tpu-vm ssh t1 ")
    line = lines[0]
    for part in ("--zone=us-west4-a", "--worker=all", "--distributed", "--config=configs/pg19_base.py",
                 "--workdir=/mnt/x", "--mode=train", "--config.train.steps=5", ".venv/bin/python -m famjax.main"):
        assert part in line, part
    assert "--project" not in line


def test_tpu_train_quotes_extra_args_and_honours_env():
    env = dict(TPU, PROJECT="p1", MODE="train_and_eval", REPO_DIR="/opt/fj")
    r = sh("tpu_vm.sh", "train", "c.py", "/mnt/x", "--config.data.name=a b", env=env)
    assert r.returncode == 0, r.stderr
    assert "--project=p1" in r.stdout and "--mode=train_and_eval" in r.stdout and "cd /opt/fj &&" in r.stdout
    assert r"--config.data.name=a\ b" in r.stdout  # printf %q for the remote shell


def test_tpu_setup_and_create_dry_run():
    r = sh("tpu_vm.sh", "setup", env=TPU)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\+ git -C \S+ archive ", r.stdout, re.M)
    assert re.search(r"^\+ gcloud compute tpus tpu-vm scp .*--worker=all", r.stdout, re.M)
    assert re.search(r"^\+ gcloud compute tpus tpu-vm ssh t1 .*--worker=all", r.stdout, re.M)
    assert "python3 -m venv" in r.stdout and "jax[tpu]" in r.stdout
    r = sh("tpu_vm.sh", "create", env=TPU)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("+ gcloud compute tpus tpu-vm create t1 --zone=us-west4-a "
                                "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite")


def test_tpu_errors():
    r = sh("tpu_vm.sh", "train", "c.py", "/mnt/x", env={"ZONE": "z", "DRY_RUN": "1"})
    assert r.returncode != 0 and "TPU_NAME" in r.stderr and not r.stdout
    r = sh("tpu_vm.sh", "frobnicate", env=TPU)
    assert r.returncode == 2 and "unknown command" in r.stderr and len(r.stderr.splitlines()) == 1
    r = sh("tpu_vm.sh", "train", "c.py", env=TPU)
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh("tpu_vm.sh", "train", "c.py", "gs://bucket/runs", env=TPU)
    assert r.returncode != 0 and "gcsfuse" in r.stderr and not r.stdout
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
           env={"DRY_RUN": "1", "CONFIG": "configs/x.py", "WORKDIR": "/w"})
    assert r.returncode == 0 and "--config=configs/x.py --workdir=/w" in r.stdout
    r = sh("slurm_gpu.sbatch", env={"DRY_RUN": "1"})
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh("slurm_gpu.sbatch", "c.py", "gs://b/r", env={"DRY_RUN": "1"})
    assert r.returncode != 0 and "gcsfuse" in r.stderr
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
    r = sh("local_processes.sh", "two", "c.py", str(tmp_path), env={"DRY_RUN": "1"})
    assert r.returncode == 2 and "N must be" in r.stderr
