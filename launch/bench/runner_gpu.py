"""One configuration of the `gpu` section per process, each with the whole device to itself.

Configurations run one after another, so a ~1B model never shares the GPU's memory, and each exits
afterwards, so nothing (CUDA caches, DeepSpeed's and megatron-core's globals) carries over. The
processes come from a forkserver: it imports torch, DeepSpeed, megatron-core, transformers and Loom
once, never touches CUDA (CUDA cannot be used in a child forked from a process that initialised it),
and forks each configuration in well under a second. Every child starts a one-rank process group —
NCCL on CUDA, gloo on the CPU — as `loom train` does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

from loom.launch.runtime.fork import WorkerError, free_port

PRELOAD = ["loom.launch.bench.preload_gpu"]
CUDA_AFTER_FORK = ("Cannot re-initialize CUDA in forked subprocess", "initialization error")
"""What a child says when its parent initialised CUDA after all; the runner then spawns instead."""
_context = None


def _context_once(spawn: bool = False):
    global _context
    if spawn:
        _context = mp.get_context("spawn")  # slower (each child imports everything) but always CUDA-safe
    if _context is None:
        # the forkserver and its children must not initialise CUDA while asking whether it exists
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(fn, kwargs: dict, device_type: str, port: int, conn) -> None:
    try:
        import datetime
        import logging
        import warnings

        import torch
        import torch.distributed as dist

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if device_type == "cuda":
            torch.cuda.set_device(0)
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=600))
        result = fn(device_type, **kwargs)
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator, which decides
        try:
            text = f"{type(exc).__name__}: {exc}"
            conn.send(("error", text.splitlines()[0][:500] + "\n" + traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()
        os._exit(0)


def run_isolated(fn, device_type: str, timeout: float, **kwargs):
    """`fn(device_type, **kwargs)` in a fresh process; its return value, or WorkerError (with the first
    line of the child's exception, e.g. an out-of-memory error) when it raised, died or ran past `timeout`."""
    started = time.monotonic()
    try:
        return _run(_context_once(), fn, device_type, timeout, kwargs)
    except WorkerError as exc:
        if _context.get_start_method() == "spawn" or not any(s in str(exc) for s in CUDA_AFTER_FORK):
            raise
    return _run(_context_once(spawn=True), fn, device_type, timeout - (time.monotonic() - started), kwargs)


def _run(ctx, fn, device_type: str, timeout: float, kwargs: dict):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(fn, kwargs, device_type, free_port(), child), name="bench-gpu")
    proc.start()
    child.close()
    deadline, answered = time.monotonic() + timeout, False
    try:
        while not parent.poll(0.2):
            if not proc.is_alive() and not parent.poll(0):
                raise WorkerError(f"{fn.__name__}: the process died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise WorkerError(f"{fn.__name__}: stopped after {timeout:.0f} s (time limit)")
        status, payload = parent.recv()
        answered = True
    except EOFError:
        raise WorkerError(f"{fn.__name__}: the process exited without a result") from None
    finally:
        if proc.is_alive():
            proc.join(timeout=30 if answered else 0)  # a child that answered exits by itself
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        parent.close()
    if status != "ok":
        raise WorkerError(payload)
    return payload
