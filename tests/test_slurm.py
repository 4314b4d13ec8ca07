"""slurm/train.sbatch on a real 2-node Slurm cluster stood up on this machine (scripts/slurm_cluster.sh):
a CPU DDP run (gloo) of the tiny model on 2 nodes x 1 task, then a run requeued mid-way that
resumes from its checkpoint. Needs root and Debian's slurm-wlm + munge (CI installs them)."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = REPO / "slurm" / "train.sbatch"
TRAIN = ["hardware=ddp", "hardware.accelerator=cpu", "hardware.precision=32-true", "data.num_workers=0",
         "data.datasets.shapes.n_max=1", "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=1"]
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none", "--time=15"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None and not os.path.exists("/usr/sbin/slurmctld"):
        pytest.fail("slurm-wlm is not installed (apt-get install slurm-wlm munge); .ci/run installs it")
    d = tmp_path_factory.mktemp("slurm")
    script = REPO / "scripts" / "slurm_cluster.sh"
    out = subprocess.run(["bash", str(script), "start", str(d)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PYTHONPATH": str(REPO),
           "VLMTRAIN_PYTHON": sys.executable, "VLMTRAIN_CACHE": os.environ["VLMTRAIN_CACHE"]}
    yield d, env
    subprocess.run(["bash", str(script), "stop", str(d)], timeout=60)


def _submit(env, cwd, run_dir, *overrides):
    out = subprocess.run(["sbatch", "--parsable", *CPU_JOB, str(SBATCH), *TRAIN, *overrides],
                         env={**env, "VLMTRAIN_RUN_DIR": str(run_dir)}, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(env, job, timeout=420):
    end = time.time() + timeout
    while time.time() < end:
        info = _job(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(2)
    pytest.fail(f"job {job} still {_job(env, job).get('JobState')} after {timeout}s")


def _global_step(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def _read(paths):
    return "\n".join(p.read_text(errors="replace") for p in sorted(paths))


def test_two_node_ddp_run(cluster, tmp_path):
    d, env = cluster
    run_dir = tmp_path / "run"
    job = _submit(env, tmp_path, run_dir, "stage.max_steps=3")
    info = _wait(env, job)
    logs = sorted((run_dir / "logs").glob("*.log"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _read(logs)[-4000:]
    # one task on each node, each one rank of a world of 2
    assert [p.name for p in logs] == [f"job{job}-restart0-rank0.log", f"job{job}-restart0-rank1.log"]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0].read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1].read_text()
    assert info["NodeList"] == "n[1-2]"
    job_log = (tmp_path / f"slurm-vlmtrain-{job}.out").read_text()
    assert "2 nodes x 1 tasks" in job_log
    # training finished and the checkpoint is whole
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"] and ckpt["optimizer_states"] and len(ckpt["rng_states"]) == 2
    assert not (run_dir / "checkpoints" / "last.ckpt.tmp").exists()


def test_requeued_job_resumes_and_finishes(cluster, tmp_path):
    d, env = cluster
    run_dir = tmp_path / "run"
    job = _submit(env, tmp_path, run_dir, "stage.max_steps=10")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    end = time.time() + 300
    while not ckpt.exists():  # wait until it has taken (and saved) a step
        assert time.time() < end and _job(env, job).get("JobState") in ("PENDING", "RUNNING"), _job(env, job)
        time.sleep(0.5)
    out = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = _wait(env, job, timeout=600)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    first = _read((run_dir / "logs").glob(f"job{job}-restart0-rank*.log"))
    second = _read((run_dir / "logs").glob(f"job{job}-restart1-rank*.log"))
    m = re.search(r"preempted at step (\d+): saved", first)
    assert m, first[-3000:]  # SIGTERM from the requeue: the step finished, then last.ckpt was written
    stopped_at = int(m.group(1))
    assert 1 <= stopped_at < 10
    assert "resuming from" in second and "max_steps=10` reached" in second, second[-3000:]
    assert _global_step(ckpt) == 10
