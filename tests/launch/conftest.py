"""Shared pieces of the launcher tests: what the machine must offer, the tiny run, process handling.

Every launcher test runs the project's own scripts (launch/slurm, launch/deepspeed, launch/cluster) as
subprocesses. Processes are started in their own session and stopped by process-group id; clusters and
network namespaces are torn down by fixtures, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"
PYTHON = sys.executable
CLUSTER = REPO / "launch" / "cluster"
# a few quick steps: no evaluation, a checkpoint every 2 steps, every step logged to TensorBoard
QUICK = ["train.eval_every=0", "checkpoint.every=2", "train.log_every=1"]


# the Debian package of every tool a launcher test needs
PACKAGES = {
    "ip": "iproute2",
    "ss": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "scontrol": "slurm-client",
    "munged": "munge",
    "mungekey": "munge",
    "/usr/sbin/sshd": "openssh-server",
    "ssh": "openssh-client",
    "pdsh": "pdsh",
}
NETNS_TOOLS = ("ip", "nsenter", "unshare")
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey", "ss")
SSH_TOOLS = ("/usr/sbin/sshd", "ssh", "pdsh")


def in_ci() -> bool:
    """CI=true (or 1/yes): a launcher test whose tool or privilege is missing fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip outside CI; in CI a missing prerequisite is a failure, never a silent skip."""
    if in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _found(tool: str) -> bool:
    return os.access(tool, os.X_OK) if os.path.isabs(tool) else shutil.which(tool) is not None


def apt_install(packages: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
    if update.returncode != 0:
        return update
    return subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def require_tools(*tools: str, installed_by_script: bool = False) -> None:
    """Every tool must be on this machine. In CI (as root, with apt-get) missing ones are installed, and
    what is still missing fails the test; outside CI the test is skipped with the tools and packages named.
    `installed_by_script`: the project script the test runs apt-installs them itself (local_slurm.sh up,
    netns_hosts.sh ssh-up), so with root and apt-get there is nothing to do here."""
    missing = [t for t in tools if not _found(t)]
    if not missing:
        return
    can_apt = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if installed_by_script and can_apt:
        return
    detail = ""
    if in_ci() and can_apt:
        packages = sorted({PACKAGES[t] for t in missing})
        res = apt_install(packages)
        missing = [t for t in tools if not _found(t)]
        if not missing:
            return
        detail = f"; apt-get install {' '.join(packages)} exited {res.returncode}: {res.stderr.strip()[-500:]}"
    named = ", ".join(f"{t} (Debian package {PACKAGES[t]})" for t in missing)
    unavailable(f"missing {named}{detail}")


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (Slurm daemons, network namespaces, apt-get)")


def require_netns() -> None:
    """Root, iproute2, util-linux and a kernel with network namespaces, veth and bridges."""
    require_root()
    require_tools(*NETNS_TOOLS)
    probe = f"loomprobe{os.getpid()}"
    try:
        steps = [
            ["ip", "netns", "add", probe],
            ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        ]
        for cmd in steps:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                unavailable(f"network namespaces unusable here: {' '.join(cmd)}: {res.stderr.strip()}")
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(extra: dict | None = None) -> dict:
    """The environment launched jobs inherit (Slurm jobs get the submitter's environment)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    env.update(extra or {})
    return env


class Proc:
    """A command in its own session: stopped by its process-group id, never by name."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None, cwd: Path = REPO, kill_only: bool = False):
        self.cmd, self.log, self.kill_only = [str(c) for c in cmd], log, kill_only
        self._out = open(log, "w")
        self.popen = subprocess.Popen(
            self.cmd,
            cwd=cwd,
            env=env or job_env(),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(self.cmd)}\n{self.text()[-4000:]}") from None
        finally:
            if not self._out.closed:
                self._out.flush()

    def stop(self) -> None:
        """TERM the process group, then KILL. Never INT. kill_only: straight KILL, for DeepSpeed's multi-node
        runner, whose INT/TERM handler would `pkill -f` the launch command line on every host."""
        if self.popen.poll() is None:
            steps = ((signal.SIGKILL, 5),) if self.kill_only else ((signal.SIGTERM, 15), (signal.SIGKILL, 5))
            for sig, grace in steps:
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._out.close()

    def text(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")


@pytest.fixture
def procs():
    """Processes a test starts; whatever still runs when the test ends is stopped."""
    started: list[Proc] = []

    def start(cmd, log, env=None, cwd=REPO) -> Proc:
        p = Proc(cmd, log, env, cwd)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def loss_curve(run_dir: Path) -> dict[int, float]:
    from tests.e2e.runner import read_scalars

    return read_scalars(run_dir / "tensorboard")["train/loss"]


@pytest.fixture(scope="session")
def tiny_data():
    """Tokenizer and shards of the tiny config exist before concurrent jobs start (no preparation races).
    Requested after the skip checks, so a skipped module prepares nothing."""
    from loom.launch.config import load_config
    from loom.launch.train.prepare_data import _prepare_on_this_rank

    cfg = load_config(str(REPO / TINY), [], world_size=1, check_files=False)
    _prepare_on_this_rank(cfg.data, cfg.model.seq_length, cfg.model.vocab_size)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
