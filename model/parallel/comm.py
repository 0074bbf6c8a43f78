"""The communication-device rule: every collective Loom itself issues goes through this module.

NCCL moves only CUDA tensors; gloo moves CPU tensors. So the device of a collective is a property of its
process group, not of the caller: `device_for(group)` is CUDA for an NCCL group and CPU otherwise, and
the wrappers here move a tensor there and back, so a stop flag created on the CPU works on a GPU
cluster unchanged. Python objects (strings, dicts, lists of names) go through torch's object
collectives; on the world they use a gloo side group created once (OLMo-core's "bookkeeping device"),
so they never occupy the GPU. Model tensors (activations, gradients, weights) already live on the
group's device and pass through without a copy.

This module imports only torch, so every Loom package may use it (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp
_bookkeeping_group = None


def device_for(group=None) -> torch.device:
    """The device a collective on `group` must use: CUDA for NCCL groups, CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bookkeeping_group():
    """A gloo group over all ranks for object collectives (the default group itself when it is gloo)."""
    global _bookkeeping_group
    if dist.get_backend() == "gloo":
        return None
    if _bookkeeping_group is None:
        _bookkeeping_group = dist.new_group(backend="gloo")
    return _bookkeeping_group


def reset() -> None:
    """Forget the side group (after `destroy_process_group`, e.g. between tests in one process)."""
    global _bookkeeping_group
    _bookkeeping_group = None


def _on_group_device(tensor: torch.Tensor, group):
    device = device_for(group)
    return tensor if tensor.device == device else tensor.to(device)


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group`, whatever device the tensor is on."""
    moved = _on_group_device(tensor, group)
    dist.all_reduce(moved, op=op, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_values(values: list[float], op=ReduceOp.SUM, group=None, dtype=torch.float64) -> list[float]:
    """All-reduce a few Python numbers (flags, counts, sums) over `group`."""
    t = torch.tensor(values, dtype=dtype, device=device_for(group))
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks), on the caller's device."""
    moved = _on_group_device(tensor.contiguous(), group)
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, moved, group=group)
    return [p if p.device == tensor.device else p.to(tensor.device) for p in parts]


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src`."""
    moved = _on_group_device(tensor, group)
    dist.broadcast(moved, src=src, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def _object_group(group):
    return bookkeeping_group() if group is None else group


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's picklable `obj`, in rank order of `group`."""
    group = _object_group(group)
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, dst: int = 0, group=None) -> Optional[list]:
    """Every rank's picklable `obj` in rank order on global rank `dst`; None on the other ranks."""
    group = _object_group(group)
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """`obj` of global rank `src`, on every rank of `group`."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group(group))
    return box[0]


def barrier(group=None) -> None:
    dist.barrier(group=_object_group(group))


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group) -> None:
    """Post matched point-to-point sends and receives together (the pipeline's exchange) and wait for
    them. `sends`/`recvs` are (tensor, global peer rank) pairs; received values land in the given
    tensors. Tensors not on the group's device travel through copies on it (gloo cannot send CUDA
    memory), so the same schedule runs on NCCL, on gloo, and on gloo with CUDA compute."""
    device = device_for(group)
    staged_recvs = [(t if t.device == device else torch.empty_like(t, device=device), t) for t, _ in recvs]
    ops = [dist.P2POp(dist.isend, _on_group_device(t.contiguous(), group), peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, staged, peer, group) for (staged, _), (_, peer) in zip(staged_recvs, recvs)]
    if not ops:
        return
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    for staged, target in staged_recvs:
        if staged is not target:
            target.copy_(staged)
