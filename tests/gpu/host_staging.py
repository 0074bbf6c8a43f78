"""Check-only shim: torch.distributed collectives on CUDA tensors staged through host copies.

NCCL refuses two ranks on one GPU, and gloo handles only some collectives on CUDA tensors. To still run
TP=2 and PP=2 with both ranks' models on the one GPU, the layout checks patch torch.distributed (in
their own worker processes only) so that every collective and point-to-point exchange copies CUDA
tensors to the CPU, runs the original gloo call there, and copies the results back. Loom's code is
unchanged: its CUDA compute paths (sharded layers, pipeline stages, the techniques) run for real; only
the transport goes through the host. Nothing in Loom imports this module.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.distributed as dist

_INSTALLED = False


def _host(t):
    return t.detach().cpu() if torch.is_tensor(t) and t.is_cuda else t


def _back(original, staged) -> None:
    if torch.is_tensor(original) and original.is_cuda and staged is not original:
        with torch.no_grad():
            original.copy_(staged)


class _Staged:
    """A finished (synchronous) request: the copy back already happened."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _finish(result, async_op: bool, copy_back):
    """Run the original synchronously (copies back need the result), then report it as the caller asked."""
    if result is not None and hasattr(result, "wait"):
        result.wait()
    copy_back()
    return _Staged() if async_op else None


def _stage_in_place(fn):
    """all_reduce / broadcast / reduce: one tensor, updated in place."""

    @functools.wraps(fn)
    def wrapper(tensor, *args, async_op=False, **kwargs):
        if not (torch.is_tensor(tensor) and tensor.is_cuda):
            return fn(tensor, *args, async_op=async_op, **kwargs)
        staged = _host(tensor)
        return _finish(fn(staged, *args, async_op=async_op, **kwargs), async_op, lambda: _back(tensor, staged))

    return wrapper


def _stage_list_output(fn):
    """all_gather(list_out, tensor_in): a list of outputs filled from one input."""

    @functools.wraps(fn)
    def wrapper(outputs, tensor, *args, async_op=False, **kwargs):
        if not (torch.is_tensor(tensor) and tensor.is_cuda):
            return fn(outputs, tensor, *args, async_op=async_op, **kwargs)
        staged_out = [torch.empty_like(o, device="cpu") for o in outputs]
        result = fn(staged_out, _host(tensor), *args, async_op=async_op, **kwargs)

        def copy_back():
            for o, s in zip(outputs, staged_out):
                _back(o, s)

        return _finish(result, async_op, copy_back)

    return wrapper


def _stage_tensor_output(fn):
    """all_gather_into_tensor / reduce_scatter_tensor (output, input)."""

    @functools.wraps(fn)
    def wrapper(output, tensor, *args, async_op=False, **kwargs):
        if not (torch.is_tensor(tensor) and tensor.is_cuda):
            return fn(output, tensor, *args, async_op=async_op, **kwargs)
        staged_out = torch.empty_like(output, device="cpu")
        result = fn(staged_out, _host(tensor), *args, async_op=async_op, **kwargs)
        return _finish(result, async_op, lambda: _back(output, staged_out))

    return wrapper


def _stage_p2p(original_batch):
    @functools.wraps(original_batch)
    def batch_isend_irecv(ops):
        staged_ops, receives = [], []
        for op in ops:
            tensor = op.tensor
            if not tensor.is_cuda:
                staged_ops.append(op)
                continue
            host = torch.empty_like(tensor, device="cpu")
            if op.op is dist.isend or getattr(op.op, "__name__", "") == "isend":
                host.copy_(tensor)
            else:
                receives.append((tensor, host))
            staged_ops.append(dist.P2POp(op.op, host, op.peer, op.group, op.tag))
        for request in original_batch(staged_ops):
            request.wait()
        for tensor, host in receives:
            _back(tensor, host)
        return [_Staged() for _ in ops]

    return batch_isend_irecv


def _stage_send(fn):
    @functools.wraps(fn)
    def wrapper(tensor, *args, **kwargs):
        return fn(_host(tensor), *args, **kwargs)

    return wrapper


def _stage_recv(fn, synchronous: bool):
    @functools.wraps(fn)
    def wrapper(tensor, *args, **kwargs):
        if not tensor.is_cuda:
            return fn(tensor, *args, **kwargs)
        host = torch.empty_like(tensor, device="cpu")
        result = fn(host, *args, **kwargs)
        if not synchronous:
            result.wait()
        _back(tensor, host)
        return result if synchronous else _Staged()

    return wrapper


def install() -> None:
    """Patch torch.distributed in this process (idempotent). Callers look the functions up at call
    time (`dist.all_reduce(...)`, `torch.distributed.all_gather_into_tensor(...)`), so this reaches
    megatron-core, DeepSpeed and Loom alike."""
    global _INSTALLED
    if _INSTALLED:
        return
    replaced = {}
    for name in ("all_reduce", "broadcast", "reduce"):
        replaced[name] = _stage_in_place(getattr(dist, name))
    replaced["all_gather"] = _stage_list_output(dist.all_gather)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base"):
        if hasattr(dist, name):
            replaced[name] = _stage_tensor_output(getattr(dist, name))
    replaced["batch_isend_irecv"] = _stage_p2p(dist.batch_isend_irecv)
    replaced["send"] = _stage_send(dist.send)
    replaced["recv"] = _stage_recv(dist.recv, synchronous=True)
    originals = {id(getattr(dist, name)): fn for name, fn in replaced.items()}
    for name, fn in replaced.items():
        setattr(dist, name, fn)
    # megatron-core keeps module-level aliases (dist_all_gather_func = torch.distributed.all_gather_into_tensor)
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("megatron.", "deepspeed.", "loom.")):
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in originals:
                setattr(module, attr, originals[id(value)])
    _INSTALLED = True
