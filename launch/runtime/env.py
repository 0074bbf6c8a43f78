"""Rank, world size and rendezvous address from whichever launcher started us.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT;
`srun` exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the job's node list. A plain
`python -m loom.launch.cli train` is a world of one.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def _first_slurm_host(env=None) -> str:
    """The first node of the job, as an address the other nodes can reach: its name if that resolves,
    else the node's NodeAddr from scontrol (node names need not be in DNS, e.g. several slurmd on one host)."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        names = _scontrol("show", "hostnames", nodelist).split()
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]
    if not names:
        return "127.0.0.1"
    head = names[0]
    try:
        socket.getaddrinfo(head, None)
        return head
    except OSError:
        pass
    try:
        fields = dict(f.split("=", 1) for f in _scontrol("show", "node", head, "-o").split() if "=" in f)
        return fields.get("NodeAddr") or head
    except (OSError, subprocess.SubprocessError):
        return head


def read_dist_env(environ=None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "DEEPSPEED_ENV" in env or "CROSS_RANK" in env else "torchrun"
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            launcher,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # a port per job and per restart (as in launch/slurm/*.sbatch): a requeued job may land on the
        # same node while the previous run's socket is still in TIME_WAIT
        job, restart = int(env.get("SLURM_JOB_ID", 0)), int(env.get("SLURM_RESTART_COUNT", 0))
        port = int(env.get("MASTER_PORT", 20000 + (job % 4000) * 10 + restart % 10))
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _first_slurm_host(env),
            port,
            "srun",
        )
    from loom.launch.runtime.fork import free_port  # a single process needs a store port too; a fixed one would clash

    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single process")


def init_distributed(denv: DistEnv, timeout_s: float = 600.0) -> str:
    """Start the default process group (NCCL on GPUs, gloo on CPU); returns the backend."""
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        LOCAL_RANK=str(denv.local_rank),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(denv.master_port),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=denv.rank, world_size=denv.world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return backend


def loom_command(args: list[str], nproc: int = 1) -> list[str]:
    """The command line of `loom ARGS` in this interpreter: one process, or `nproc` under torchrun."""
    if nproc == 1:
        return [sys.executable, "-m", "loom.launch.cli", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "loom.launch.cli", *args]
