"""Run a function in N gloo processes (OLMo-core's `run_distributed_test` idea).

Children are forked from the pytest process after it has imported torch, megatron-core and
DeepSpeed once (`preimport_heavy_modules`), which saves 6-20 s of imports per rank on 2 cores.
Each child runs single-threaded with a short collective timeout, and its return value (or its
traceback) travels back through a pipe, so a failure in one rank fails the test with that
rank's own traceback instead of a hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable


class DistributedTestError(AssertionError):
    """A rank raised, died, or the group did not finish in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preimport_heavy_modules() -> None:
    """Import once in the parent so forked children inherit the modules."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.tensor_parallel  # noqa: F401
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401  (DeepSpeed/optimizers import it lazily, ~4 s)

        from loom.model.parallel import cpu_compat

        cpu_compat.setup_deepspeed_env()
        import deepspeed  # noqa: F401


def _child(rank: int, world_size: int, port: int, backend: str, timeout_s: float, fn, args, kwargs, conn):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        result = fn(rank, world_size, *args, **kwargs)
        conn.send(("ok", pickle.dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - report everything, including SystemExit
        conn.send(("error", f"rank {rank} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout: float = 300.0,
    collective_timeout: float = 120.0,
    **kwargs,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` in `world_size` forked processes.

    Returns the per-rank return values (they must pickle). Raises DistributedTestError with the
    first failing rank's traceback, or when a rank exits without reporting, or on timeout.
    """
    ctx = mp.get_context("fork")
    port = free_port()
    pipes, procs = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_child,
            args=(rank, world_size, port, backend, collective_timeout, fn, args, kwargs, child_conn),
            daemon=True,
        )
        p.start()
        child_conn.close()
        pipes.append(parent_conn)
        procs.append(p)

    results: list[Any] = [None] * world_size
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    failures: dict[int, str] = {}
    grace_until = None  # after the first failure, give the other ranks a moment to report theirs
    try:
        while pending:
            now = time.monotonic()
            if grace_until is not None and now > grace_until:
                break
            if now > deadline:
                failures[-1] = f"timed out after {timeout:.0f}s; ranks {sorted(pending)} did not finish"
                break
            for rank in list(pending):
                conn = pipes[rank]
                if conn.poll(0.02):
                    try:
                        status, payload = conn.recv()
                    except EOFError:
                        status, payload = "error", f"rank {rank} exited (code {procs[rank].exitcode}) without a result"
                    pending.discard(rank)
                    if status == "ok":
                        results[rank] = pickle.loads(payload)
                    else:
                        failures[rank] = payload
                elif not procs[rank].is_alive() and not conn.poll(0):
                    pending.discard(rank)
                    failures[rank] = f"rank {rank} died with exit code {procs[rank].exitcode} without a result"
            if failures and grace_until is None:
                grace_until = time.monotonic() + 3.0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill() if failures else p.join(timeout=30)
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    if failures:
        # a peer's crash shows up in the others as "connection closed": report the cause first
        def is_echo(text: str) -> bool:
            return "Connection closed by peer" in text or "Connection reset by peer" in text

        ordered = sorted(failures.items(), key=lambda kv: (is_echo(kv[1]), kv[0]))
        raise DistributedTestError("\n\n".join(text for _, text in ordered))
    return results
