"""The project's sbatch scripts, unchanged, on a real two-node Slurm cluster brought up on this machine
(launch/cluster/local_slurm.sh: Debian's slurmctld + two slurmd + munge, all state under tmp)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch.conftest import CLUSTER, QUICK, REPO, TINY, job_env, loss_curve, require_root, wait_for

LOCAL_SLURM = CLUSTER / "local_slurm.sh"


class LocalSlurm:
    def __init__(self, base: Path):
        self.base = base
        self.env = job_env({"LOOM_SLURM_DIR": str(base), "SLURM_CONF": str(base / "etc" / "slurm.conf")})

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(LOCAL_SLURM), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self) -> str:
        parts = []
        for log in sorted((self.base / "state" / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def sbatch(self, script: str, *args: str, out_dir: Path) -> int:
        # --output only moves the log out of the repository; the script itself is used as it is
        res = subprocess.run(["sbatch", "--parsable", f"--output={out_dir}/%x-%j.out", script, *args],
                             env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"sbatch failed: {res.stderr}\n{self.logs()}"
        return int(res.stdout.strip().split(";")[0])

    def wait(self, job: int, timeout: float = 300) -> str:
        """Poll scontrol until the job has ended (local_slurm.sh wait); returns its final record."""
        res = self.script("wait", str(job), str(int(timeout)), timeout=timeout + 30)
        return res.stderr + self.show(job)

    def show(self, job: int) -> str:
        return subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=self.env, capture_output=True,
                              text=True, timeout=30).stdout

    def signal_batch_shell(self, job: int, sig: str) -> None:
        """What Slurm does at `--signal=B:USR1@N` before the time limit: signal only the batch shell."""
        subprocess.run(["scancel", "--batch", f"--signal={sig}", str(job)], env=self.env, check=True, timeout=30)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_root()
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        res = cluster.script("up", timeout=600)  # installs the Debian packages on first use (~35 s)
        assert res.returncode == 0, f"local_slurm.sh up failed:\n{res.stdout}\n{res.stderr}\n{cluster.logs()}"
        yield cluster
    finally:
        res = cluster.script("down", timeout=180)
        assert res.returncode == 0, f"local_slurm.sh down failed:\n{res.stderr}"


def field(record: str, name: str) -> str:
    m = re.search(rf"\b{name}=(\S+)", record)
    return m.group(1) if m else ""


def job_log(out_dir: Path, job: int) -> str:
    logs = list(out_dir.glob(f"*-{job}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job log)"


def assert_completed(slurm: LocalSlurm, job: int, out_dir: Path, record: str) -> str:
    log = job_log(out_dir, job)
    assert field(record, "JobState") == "COMPLETED", f"{record}\n--- job log\n{log[-6000:]}\n{slurm.logs()}"
    return log


@pytest.mark.slow
def test_train_sbatch_trains_on_two_nodes(slurm, tmp_path):
    run = tmp_path / "run"
    job = slurm.sbatch("launch/slurm/train.sbatch", TINY, f"output_dir={run}", "train.max_steps=4", *QUICK,
                       out_dir=tmp_path)
    log = assert_completed(slurm, job, tmp_path, slurm.wait(job, timeout=300))
    assert field(slurm.show(job), "NodeList") == "node[1-2]"
    assert f"loom-slurm: job {job} restart 0 on node[1-2] (2 nodes x 1 ranks)" in log
    assert "2 process(es) via torchrun" in log, log[-3000:]
    assert "finished at step 4 (exit code 0)" in log
    assert (run / "checkpoints" / "step_00000004").is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(loss_curve(run)) == [1, 2, 3, 4]


def _preempt_and_resume(slurm: LocalSlurm, tmp_path: Path, script: str, launcher: str, max_steps: int) -> None:
    """Submit, send the time-limit signal once training runs, expect: checkpoint, exit 75, requeue, resume."""
    run = tmp_path / "run"
    # checkpoint.every=0: the only checkpoint before the end is the one the signal causes
    job = slurm.sbatch(script, TINY, f"output_dir={run}", f"train.max_steps={max_steps}", "train.eval_every=0",
                       "checkpoint.every=0", "train.log_every=1", out_dir=tmp_path)
    wait_for(lambda: re.search(r"^step 2/", job_log(tmp_path, job), re.M), 240, "step 2 in the job log")
    slurm.signal_batch_shell(job, "USR1")
    record = slurm.wait(job, timeout=300)
    log = assert_completed(slurm, job, tmp_path, record)
    assert field(record, "Restarts") == "1", record

    first, _, second = log.partition(f"loom-slurm: job {job} restart 1 ")
    assert second, f"the job never restarted:\n{log[-5000:]}"
    assert f"{launcher}" in first and "USR1" in first, first[-3000:]
    stopped = re.search(r"finished at step (\d+) \(exit code 75\)", first)
    assert stopped, f"first run did not stop with exit code 75:\n{first[-4000:]}"
    step = int(stopped.group(1))
    assert 2 <= step < max_steps, f"stopped at step {step}"
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert f"checkpoint saved: {ckpt}" in first
    assert f"requeueing job {job} (restart 1)" in first
    assert f"resumed from {ckpt} at step {step}" in second, second[-4000:]
    assert f"finished at step {max_steps} (exit code 0)" in second
    resumed_steps = [int(n) for n in re.findall(r"^step (\d+)/", second, re.M)]
    assert resumed_steps == list(range(step + 1, max_steps + 1)), resumed_steps
    assert sorted(loss_curve(run)) == list(range(1, max_steps + 1))
    assert (run / "checkpoints" / f"step_{max_steps:08d}").is_dir()


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    _preempt_and_resume(slurm, tmp_path, "launch/slurm/train.sbatch", "via torchrun", max_steps=40)


@pytest.mark.slow
def test_deepspeed_sbatch_requeues_and_resumes(slurm, tmp_path):
    _preempt_and_resume(slurm, tmp_path, "launch/slurm/train_deepspeed.sbatch", "via deepspeed", max_steps=40)
