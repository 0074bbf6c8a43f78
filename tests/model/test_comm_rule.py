"""The communication-device rule (model/parallel/comm.py): Loom's own collectives go through `comm`, whose
device follows the process group's backend, so a tensor made on the CPU still works on NCCL.

NCCL cannot be run on this CPU machine, so the rule is held two ways: a scan of the source for direct
`torch.distributed` collectives outside comm.py (each one would send whatever device its tensor is on),
and `device_for` answering CUDA for an NCCL group (the backend faked). The wrappers themselves are checked
against plain gloo collectives in 2 real processes."""

from __future__ import annotations

import ast

import pytest
import torch

from loom.model.parallel import comm
from tests.architecture.import_graph import module_files
from tests.harness import run_distributed

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "barrier",
    "all_gather_object",
    "gather_object",
    "broadcast_object_list",
    "scatter_object_list",
}
ALLOWED = {"loom.model.parallel.comm"}


def direct_collectives(source: str) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls of a collective X, as 'line: name'."""
    aliases = {"torch.distributed"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and node.names:
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_the_scan_finds_a_direct_collective():
    """The scanner itself must catch the shapes the rule forbids (else the next test cannot fail)."""
    bad = (
        "import torch.distributed as dist\nimport torch\n"
        "def f(t, g):\n    dist.all_reduce(t, group=g)\n    torch.distributed.broadcast(t, 0)\n"
        "    dist.get_rank()\n"
    )
    assert direct_collectives(bad) == ["4: dist.all_reduce", "5: torch.distributed.broadcast"]
    renamed = "import torch.distributed as td\ntd.gather_object(1, None)\n"
    assert direct_collectives(renamed) == ["2: td.gather_object"]


def test_loom_issues_collectives_only_through_comm():
    offenders = {
        name: hits
        for name, path in module_files().items()
        if name not in ALLOWED and (hits := direct_collectives(path.read_text()))
    }
    assert not offenders, f"collectives outside model/parallel/comm.py (use comm.*): {offenders}"


@pytest.mark.parametrize(("backend", "expected"), [("nccl", "cuda"), ("gloo", "cpu")])
def test_device_follows_the_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert comm.device_for().type == expected


def _wrappers_match_gloo(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out = {}
    t = torch.arange(4, dtype=torch.float64) + rank
    ref = t.clone()
    dist.all_reduce(ref)
    out["all_reduce"] = torch.equal(comm.all_reduce(t.clone()), ref)
    out["all_reduce_values"] = comm.all_reduce_values([rank, 1.0]) == [sum(range(world)), float(world)]
    ref_parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(ref_parts, t)
    out["all_gather"] = all(torch.equal(a, b) for a, b in zip(comm.all_gather(t), ref_parts))
    out["broadcast"] = torch.equal(comm.broadcast(t.clone(), src=1), torch.arange(4, dtype=torch.float64) + 1)
    out["all_gather_object"] = comm.all_gather_object({"rank": rank}) == [{"rank": r} for r in range(world)]
    gathered = comm.gather_object(rank * 10, dst=0)
    out["gather_object"] = gathered == [r * 10 for r in range(world)] if rank == 0 else gathered is None
    out["broadcast_object"] = comm.broadcast_object(f"from {rank}", src=1) == "from 1"
    peer = 1 - rank
    received = torch.zeros(3)
    comm.exchange([(torch.full((3,), float(rank)), peer)], [(received, peer)], group=dist.group.WORLD)
    out["exchange"] = torch.equal(received, torch.full((3,), float(peer)))
    comm.barrier()
    return out


def test_wrappers_match_plain_collectives_on_two_ranks():
    for rank, checks in enumerate(run_distributed(_wrappers_match_gloo, 2)):
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"
