"""The project's sbatch scripts, unchanged, on a real Slurm cluster brought up on this machine
(launch/cluster/local_slurm.sh: Debian's slurmctld + several slurmd "nodes" + munge, all state under tmp).

Every job asks for 2 whole nodes. To keep the wall time down the module submits the jobs of all selected
tests at once to a 6-node cluster, so they run side by side; each test then waits for its own job and
checks what it did. The time-limit signal is sent by a watcher thread as soon as the job has trained 2 steps.
"""

from __future__ import annotations

import re
import subprocess
import threading
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import pytest

from tests.launch.conftest import (
    CLUSTER,
    QUICK,
    REPO,
    SLURM_TOOLS,
    TINY,
    job_env,
    loss_curve,
    require_root,
    require_tools,
    wait_for,
)

LOCAL_SLURM = CLUSTER / "local_slurm.sh"
NODES = 6  # 3 concurrent jobs x 2 nodes (the nodes share this machine's CPUs)
PREEMPT_STEPS = 40  # long enough that the signal lands well before the end


class LocalSlurm:
    def __init__(self, base: Path):
        self.base = base
        (base / "jobtmp").mkdir()
        # TMPDIR travels into the jobs: the per-node files they write (DeepSpeed hostfiles) stay under tmp
        self.env = job_env(
            {
                "LOOM_SLURM_DIR": str(base),
                "LOOM_SLURM_NODES": str(NODES),
                "SLURM_CONF": str(base / "etc" / "slurm.conf"),
                "TMPDIR": str(base / "jobtmp"),
            }
        )

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LOCAL_SLURM), *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        parts = []
        for log in sorted((self.base / "state" / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def sbatch(self, script: str, *args: str, out_dir: Path) -> int:
        # --output only moves the job log out of the repository; the script itself is used unchanged
        res = subprocess.run(
            ["sbatch", "--parsable", f"--output={out_dir}/%x-%j.out", script, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, f"sbatch failed: {res.stderr}\n{self.logs()}"
        return int(res.stdout.strip().split(";")[0])

    def wait(self, job: int, timeout: float = 300) -> str:
        """Poll scontrol until the job has ended (local_slurm.sh wait); returns its final record."""
        res = self.script("wait", str(job), str(int(timeout)), timeout=timeout + 30)
        return res.stderr + self.show(job)

    def show(self, job: int) -> str:
        return subprocess.run(
            ["scontrol", "show", "job", "-o", str(job)], env=self.env, capture_output=True, text=True, timeout=30
        ).stdout

    def signal_batch_shell(self, job: int, sig: str) -> None:
        """What Slurm does at `--signal=B:USR1@N` before the time limit: signal only the batch shell."""
        subprocess.run(["scancel", "--batch", f"--signal={sig}", str(job)], env=self.env, check=True, timeout=30)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_root()
    require_tools(*SLURM_TOOLS, installed_by_script=True)  # local_slurm.sh up apt-installs Slurm and munge
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        res = cluster.script("up", timeout=600)  # installs the Debian packages on first use (~35 s)
        assert res.returncode == 0, f"local_slurm.sh up failed:\n{res.stdout}\n{res.stderr}\n{cluster.logs()}"
        yield cluster
    finally:
        res = cluster.script("down", timeout=180)  # cancels what still runs, stops the daemons by PID
        assert res.returncode == 0, f"local_slurm.sh down failed:\n{res.stderr}"


@dataclass
class Job:
    script: str
    out: Path
    max_steps: int
    preempt: bool
    id: int = 0
    errors: list = dc_field(default_factory=list)
    watcher: threading.Thread | None = None
    done: threading.Event = dc_field(default_factory=threading.Event)

    @property
    def run(self) -> Path:
        return self.out / "run"

    def log(self) -> str:
        logs = list(self.out.glob(f"*-{self.id}.out"))
        return logs[0].read_text(errors="replace") if logs else "(no job log yet)"


def _submit(slurm: LocalSlurm, job: Job) -> None:
    if job.preempt:
        # checkpoint.every=0: the only checkpoint before the end is the one the signal causes
        args = [f"train.max_steps={job.max_steps}", "train.eval_every=0", "checkpoint.every=0", "train.log_every=1"]
    else:
        args = [f"train.max_steps={job.max_steps}", *QUICK]
    job.id = slurm.sbatch(job.script, TINY, f"output_dir={job.run}", *args, out_dir=job.out)
    if job.preempt:

        def send_signal_after_step_2():
            try:
                wait_for(
                    lambda: job.done.is_set() or re.search(r"^step 2/", job.log(), re.M),
                    400,
                    f"step 2 in job {job.id}'s log",
                )
                if not job.done.is_set():
                    slurm.signal_batch_shell(job.id, "USR1")
            except BaseException as exc:  # reported by the test
                job.errors.append(exc)

        job.watcher = threading.Thread(target=send_signal_after_step_2, daemon=True)
        job.watcher.start()


JOBS = {
    "test_train_sbatch_trains_on_two_nodes": ("launch/slurm/train.sbatch", 4, False),
    "test_time_limit_signal_checkpoints_requeues_and_resumes": ("launch/slurm/train.sbatch", PREEMPT_STEPS, True),
    "test_deepspeed_sbatch_requeues_and_resumes": ("launch/slurm/train_deepspeed.sbatch", PREEMPT_STEPS, True),
}


@pytest.fixture(scope="module")
def jobs(slurm, tiny_data, request, tmp_path_factory) -> dict[str, Job]:
    """Submit the jobs of the selected tests together; the cluster fixture cancels leftovers."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    submitted = {}
    for name, (script, steps, preempt) in JOBS.items():
        if name in selected:
            job = Job(script, tmp_path_factory.mktemp(name[5:30]), steps, preempt)
            _submit(slurm, job)
            submitted[name] = job
    return submitted


def field(record: str, name: str) -> str:
    m = re.search(rf"\b{name}=(\S+)", record)
    return m.group(1) if m else ""


def finished(slurm: LocalSlurm, job: Job) -> tuple[str, str]:
    record = slurm.wait(job.id, timeout=420)
    job.done.set()
    if job.watcher is not None:
        job.watcher.join(timeout=5)
    log = job.log()
    assert not job.errors, f"{job.errors[0]}\n--- job log\n{log[-4000:]}\n{slurm.logs()}"
    assert field(record, "JobState") == "COMPLETED", f"{record}\n--- job log\n{log[-6000:]}\n{slurm.logs()}"
    return record, log


@pytest.mark.slow
def test_train_sbatch_trains_on_two_nodes(slurm, jobs, request):
    job = jobs[request.node.originalname]
    record, log = finished(slurm, job)
    assert field(record, "NumNodes") == "2", record
    nodes = field(record, "NodeList")
    assert f"loom-slurm: job {job.id} restart 0 on {nodes} (2 nodes x 1 ranks)" in log, log[-3000:]
    assert "2 process(es) via torchrun" in log, log[-3000:]
    assert "finished at step 4 (exit code 0)" in log
    assert (job.run / "checkpoints" / "step_00000004").is_dir()
    assert (job.run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(loss_curve(job.run)) == [1, 2, 3, 4]


def _check_preempted_then_resumed(slurm: LocalSlurm, job: Job, launcher: str) -> None:
    """The signal made the ranks checkpoint and exit 75, the script requeued the job, the restart resumed."""
    record, log = finished(slurm, job)
    assert field(record, "Restarts") == "1", record
    first, _, second = log.partition(f"loom-slurm: job {job.id} restart 1 ")
    assert second, f"the job never restarted:\n{log[-5000:]}"
    assert launcher in first and "loom-slurm: USR1" in first, first[-3000:]
    stopped = re.search(r"finished at step (\d+) \(exit code 75\)", first)
    assert stopped, f"first run did not stop with exit code 75:\n{first[-4000:]}"
    step = int(stopped.group(1))
    assert 2 <= step < job.max_steps, f"stopped at step {step}"
    ckpt = job.run / "checkpoints" / f"step_{step:08d}"
    assert f"checkpoint saved: {ckpt}" in first
    assert f"requeueing job {job.id} (restart 1)" in first
    assert f"resumed from {ckpt} at step {step}" in second, second[-4000:]
    assert [int(n) for n in re.findall(r"^step (\d+)/", second, re.M)] == list(range(step + 1, job.max_steps + 1))
    assert f"finished at step {job.max_steps} (exit code 0)" in second
    assert sorted(loss_curve(job.run)) == list(range(1, job.max_steps + 1))
    assert (job.run / "checkpoints" / f"step_{job.max_steps:08d}").is_dir()


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, jobs, request):
    _check_preempted_then_resumed(slurm, jobs[request.node.originalname], "via torchrun")


@pytest.mark.slow
def test_deepspeed_sbatch_requeues_and_resumes(slurm, jobs, request):
    job = jobs[request.node.originalname]
    _check_preempted_then_resumed(slurm, job, "via deepspeed")
    # DeepSpeed's launcher passes the ranks' exit code on (torchrun turns it into 1)
    assert "loom-slurm: ranks exited with code 75" in job.log()
