"""Forked worker process groups: the one harness `loom bench` and the distributed tests share.

A `WorkerGroup` forks `world` processes from a parent that has already imported the heavy modules (so
each starts in well under a second), gives them one gloo world and a thread count, builds one object
per rank with `factory(rank, world, **kwargs)`, and runs that object's methods on every rank when asked
(`call`). Results and tracebacks travel back through pipes: a rank that raises or dies fails the call
with its own traceback — and, after a short grace, every other rank's — instead of a hang. `run_once`
is the one-shot form: run a function on every rank and return the per-rank results.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable


class WorkerError(RuntimeError):
    """A worker raised, died, or the group did not answer in time; the message carries the tracebacks."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PARENT_ENDS: list = []  # the coordinator's ends of every worker pipe (closed in each new worker)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the coordinator exits, however it exits."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _quiet_worker() -> None:
    """Benchmark workers print nothing but their results (rank > 0's stdout goes to stderr)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)


def _worker_main(rank, world, port, threads, backend, collective_timeout, quiet, factory, kwargs, conn) -> None:
    import faulthandler

    _die_with_parent()
    for end in _PARENT_ENDS:  # inherited copies would keep other workers' pipes open forever
        with contextlib.suppress(OSError):
            end.close()
    faulthandler.enable()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(threads),
    )
    if quiet:
        _quiet_worker()
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        timeout = datetime.timedelta(seconds=collective_timeout)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        with contextlib.redirect_stdout(sys.stderr) if (quiet and rank) else contextlib.nullcontext():
            obj = factory(rank, world, **kwargs)
        conn.send(("ok", {"threads": torch.get_num_threads()}))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            name, call_kwargs = msg
            try:
                conn.send(("ok", getattr(obj, name)(**call_kwargs)))
            except BaseException as exc:  # noqa: BLE001 - report everything, including SystemExit
                conn.send(("error", f"rank {rank} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    except BaseException as exc:  # noqa: BLE001
        with contextlib.suppress(Exception):
            conn.send(("error", f"rank {rank} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        with contextlib.suppress(Exception):
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        os._exit(0)


def _is_echo(text: str) -> bool:
    """A peer's crash shows up in the other ranks as a closed connection: report the cause first."""
    return "Connection closed by peer" in text or "Connection reset by peer" in text


class WorkerGroup:
    """`world` forked processes with `threads` threads each and one `backend` world, each holding the
    object `factory(rank, world, **kwargs)`; `call(method, **kw)` runs that method on every rank."""

    def __init__(
        self,
        name: str,
        factory: Callable,
        world: int = 1,
        threads: int = 1,
        timeout: float = 900.0,
        backend: str = "gloo",
        collective_timeout: float = 600.0,
        quiet: bool = True,
        grace: float = 3.0,
        **kwargs,
    ):
        self.name, self.world, self.threads, self.timeout, self.grace = name, world, threads, timeout, grace
        ctx = mp.get_context("fork")
        port = free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            args = (rank, world, port, threads, backend, collective_timeout, quiet, factory, kwargs, child)
            p = ctx.Process(target=_worker_main, args=args, daemon=False, name=f"{name}-{rank}")
            p.start()
            child.close()
            _PARENT_ENDS.append(parent)
            self.conns.append(parent)
            self.procs.append(p)
        self.info = self._gather()

    def _gather(self) -> list:
        results: list[Any] = [None] * self.world
        pending = set(range(self.world))
        failures: dict[int, str] = {}
        deadline, grace_until = time.monotonic() + self.timeout, None
        while pending:
            now = time.monotonic()
            if grace_until is not None and now > grace_until:
                break
            if now > deadline:
                failures[-1] = f"timed out after {self.timeout:.0f}s; ranks {sorted(pending)} did not answer"
                break
            for rank in list(pending):
                conn = self.conns[rank]
                if conn.poll(0.01):
                    try:
                        status, payload = conn.recv()
                    except EOFError:
                        code = self.procs[rank].exitcode
                        status, payload = "error", f"rank {rank} exited (code {code}) without a result"
                    pending.discard(rank)
                    if status == "ok":
                        results[rank] = payload
                    else:
                        failures[rank] = payload
                elif not self.procs[rank].is_alive() and not conn.poll(0):
                    pending.discard(rank)
                    failures[rank] = f"rank {rank} died with exit code {self.procs[rank].exitcode} without a result"
            if failures and grace_until is None:
                grace_until = time.monotonic() + self.grace  # let the other ranks report theirs
        if failures:
            self.close()
            ordered = sorted(failures.items(), key=lambda kv: (_is_echo(kv[1]), kv[0]))
            raise WorkerError(f"[{self.name}] " + "\n\n".join(text for _, text in ordered))
        return results

    def call(self, method: str, **kwargs) -> list:
        for conn in self.conns:
            conn.send((method, kwargs))
        return self._gather()

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            with contextlib.suppress(BrokenPipeError, OSError):
                if p.is_alive():
                    conn.send(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
            if conn in _PARENT_ENDS:
                _PARENT_ENDS.remove(conn)
        self.procs = []


class _Call:
    """A one-shot worker object: `run()` calls `fn(rank, world, *args, **kwargs)` once."""

    def __init__(self, rank: int, world: int, fn: Callable, args: tuple, kwargs: dict):
        self.rank, self.world, self.fn, self.args, self.kwargs = rank, world, fn, args, kwargs

    def run(self):
        return self.fn(self.rank, self.world, *self.args, **self.kwargs)


def run_once(
    fn: Callable,
    world: int,
    *args,
    timeout: float = 300.0,
    collective_timeout: float = 120.0,
    backend: str = "gloo",
    quiet: bool = False,
    **kwargs,
) -> list:
    """Run `fn(rank, world, *args, **kwargs)` on `world` forked ranks (1 thread each); the per-rank
    return values (they must pickle). Raises WorkerError with the failing ranks' tracebacks."""
    group = WorkerGroup(
        fn.__name__,
        _Call,
        world=world,
        threads=1,
        timeout=timeout,
        backend=backend,
        collective_timeout=collective_timeout,
        quiet=quiet,
        fn=fn,
        args=args,
        kwargs=kwargs,
    )
    try:
        return group.call("run")
    finally:
        group.close()
