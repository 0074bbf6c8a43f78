"""Multi-node launches across two simulated hosts (launch/cluster/netns_hosts.sh: network namespaces
10.99.0.1/2 behind a private bridge, own hostnames and /etc/hosts), checked against the same 2-rank job on
one host: the per-step losses must be identical.

The module starts the one-host reference and the jobs of all selected tests together (they share the
simulated hosts and use different ports), then each test waits for its job and checks it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.launch.conftest import (
    CLUSTER,
    PYTHON,
    QUICK,
    REPO,
    SSH_TOOLS,
    TINY,
    Proc,
    free_port,
    in_ci,
    job_env,
    loss_curve,
    require_netns,
)

NETNS = CLUSTER / "netns_hosts.sh"
STEPS = 4
ARGS = [f"train.max_steps={STEPS}", *QUICK]
TORCHRUN = "test_torchrun_across_two_hosts_matches_one_host"
DEEPSPEED = "test_deepspeed_pdsh_launcher_across_two_hosts_matches_one_host"


class Hosts:
    def __init__(self, state_dir):
        self.env = job_env({"LOOM_NETNS_DIR": str(state_dir), "LOOM_NETNS_PREFIX": f"lt{os.getpid()}"})

    def script(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(NETNS), *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def on(self, host: int, *cmd) -> list[str]:
        """The command line that runs cmd on simulated host `host` (hostname nodeI, address 10.99.0.I)."""
        return [str(NETNS), "exec", str(host), *map(str, cmd)]


class Launched:
    def __init__(self, out):
        self.out = out
        self.procs: dict[str, list[Proc]] = {}
        self.runs: dict[str, object] = {}
        self.skip: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._losses = None

    def reference(self) -> dict[int, float]:
        if self._losses is None:
            (proc,) = self.procs["reference"]
            rc = proc.wait(timeout=300)
            assert rc == 0, proc.text()[-4000:]
            self._losses = loss_curve(self.runs["reference"])
            assert sorted(self._losses) == list(range(1, STEPS + 1))
        return self._losses


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    require_netns()
    request.getfixturevalue("tiny_data")
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    hosts = Hosts(tmp_path_factory.mktemp("netns"))
    out = tmp_path_factory.mktemp("netns_jobs")
    state = Launched(out)
    try:
        res = hosts.script("up")
        assert res.returncode == 0, res.stderr
        if DEEPSPEED in selected:
            res = hosts.script("ssh-up", timeout=300)  # an sshd per host (+ openssh-server/pdsh if missing)
            if res.returncode != 0:
                # without the tools and without apt-get to install them, only outside CI is that a skip
                tools = all(os.access(t, os.X_OK) or shutil.which(t) for t in SSH_TOOLS)
                (state.failed if tools or shutil.which("apt-get") or in_ci() else state.skip)[DEEPSPEED] = (
                    f"netns_hosts.sh ssh-up failed:\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}"
                )
        # the reference: the same 2-rank job under torchrun on one host (the root namespace)
        state.runs["reference"] = out / "one_host"
        state.procs["reference"] = [
            Proc(
                [
                    PYTHON,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node=2",
                    "-m",
                    "loom.launch.cli",
                    "train",
                    TINY,
                    f"output_dir={out / 'one_host'}",
                    *ARGS,
                ],
                out / "one_host.log",
            )
        ]
        if TORCHRUN in selected:
            # one torchrun per host, c10d rendezvous hosted by node1; gloo must use the simulated LAN
            run = state.runs[TORCHRUN] = out / "torchrun"
            env = dict(hosts.env, GLOO_SOCKET_IFNAME="eth0")
            rdzv = [
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                "--rdzv-endpoint=node1:29400",
                f"--rdzv-id=loom-{os.getpid()}",
                "--max-restarts=0",
            ]
            state.procs[TORCHRUN] = [
                Proc(
                    hosts.on(
                        i,
                        PYTHON,
                        "-m",
                        "torch.distributed.run",
                        *rdzv,
                        "-m",
                        "loom.launch.cli",
                        "train",
                        TINY,
                        f"output_dir={run}",
                        *ARGS,
                    ),
                    out / f"torchrun-node{i}.log",
                    env=env,
                )
                for i in (1, 2)
            ]
        if DEEPSPEED in selected and DEEPSPEED not in state.skip and DEEPSPEED not in state.failed:
            # the DeepSpeed runner on node1 starts both hosts' launchers through pdsh -> ssh
            run = state.runs[DEEPSPEED] = out / "deepspeed"
            hostfile = out / "hostfile"
            hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
            env = dict(hosts.env, HOSTFILE=str(hostfile), GLOO_SOCKET_IFNAME="eth0", MASTER_PORT=str(free_port()))
            state.procs[DEEPSPEED] = [
                Proc(
                    hosts.on(1, REPO / "launch" / "deepspeed" / "run_deepspeed.sh", TINY, f"output_dir={run}", *ARGS),
                    out / "deepspeed.log",
                    env=env,
                    kill_only=True,
                )
            ]
        yield state
    finally:
        for procs in state.procs.values():
            for p in procs:
                p.stop()  # by process group; the remote ranks go with the namespaces below
        res = hosts.script("down")  # stops whatever is left in the namespaces (by PID) and deletes them
        assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_torchrun_across_two_hosts_matches_one_host(launched):
    nodes = launched.procs[TORCHRUN]
    rcs = [p.wait(timeout=300) for p in nodes]
    logs = [p.text() for p in nodes]
    assert rcs == [0, 0], "\n".join(f"--- node{i}\n{t[-3000:]}" for i, t in zip((1, 2), logs))
    text = "\n".join(logs)
    assert "2 process(es) via torchrun" in text
    assert f"finished at step {STEPS} (exit code 0)" in text
    assert loss_curve(launched.runs[TORCHRUN]) == launched.reference()


@pytest.mark.slow
def test_deepspeed_pdsh_launcher_across_two_hosts_matches_one_host(launched):
    if DEEPSPEED in launched.skip:
        pytest.skip(launched.skip[DEEPSPEED])
    assert DEEPSPEED not in launched.failed, launched.failed.get(DEEPSPEED)
    (proc,) = launched.procs[DEEPSPEED]
    rc = proc.wait(timeout=300)
    log = proc.text()
    assert rc == 0, log[-5000:]
    assert re.search(r"pdsh .*-w node1,node2", log), log[-3000:]
    assert "export GLOO_SOCKET_IFNAME=eth0" in log  # forwarded through the generated .deepspeed_env
    assert "node1: loom: tiny · 2 process(es) via deepspeed" in log
    assert f"node1: finished at step {STEPS} (exit code 0)" in log
    assert loss_curve(launched.runs[DEEPSPEED]) == launched.reference()
