"""launch/env.py under a plain `srun python -m loom.launch.cli train`: rank from SLURM_*, the first node as
MASTER_ADDR (through scontrol's NodeAddr when the node name does not resolve), a port per job and restart."""

from __future__ import annotations

import os
import stat

import pytest

from loom.launch.runtime.env import read_dist_env

FAKE_SCONTROL = """#!/bin/sh
# stands in for Slurm's scontrol: node[1-2] -> node1 node2; node1's NodeAddr is 10.1.2.3
case "$1 $2" in
  "show hostnames") echo node1; echo node2 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=vm" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    tool = tmp_path / "scontrol"
    tool.write_text(FAKE_SCONTROL)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_srun_ranks_find_the_first_node_through_scontrol(fake_scontrol):
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4321",
        "SLURM_RESTART_COUNT": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
    }
    denv = read_dist_env(env)
    assert (denv.rank, denv.world_size, denv.local_rank, denv.launcher) == (3, 4, 1, "srun")
    assert denv.master_addr == "10.1.2.3"  # "node1" does not resolve here: NodeAddr from scontrol
    assert denv.master_port == 20000 + 321 * 10 + 2  # as launch/slurm/*.sbatch derive theirs


def test_torchrun_variables_win_over_slurm_ones():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    denv = read_dist_env(env)
    assert (denv.rank, denv.world_size, denv.master_addr, denv.master_port, denv.launcher) == (
        1,
        2,
        "10.0.0.1",
        29400,
        "torchrun",
    )
