"""Forked worker process groups: each configuration gets its own processes, threads, gloo world
and memory, and waits on a pipe while the others run."""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
import warnings


class BenchError(RuntimeError):
    """A worker raised or died; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preimport() -> None:
    """Import the heavy modules once in the parent, so forked workers start in well under a second.
    The parent itself never computes with torch (a forked child cannot use OpenMP threads its
    parent already started)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.tensor_parallel  # noqa: F401
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
        from megatron.core.models.gpt import GPTModel  # noqa: F401

        from loom.model.parallel import cpu_compat

        cpu_compat.setup_deepspeed_env()
        import deepspeed  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        import loom.model.gpt  # noqa: F401
        import loom.model.parallel.parallelize  # noqa: F401


_PARENT_ENDS: list = []  # the coordinator's ends of every worker pipe (closed in each new worker)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the coordinator exits, however it exits."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(rank: int, world: int, port: int, threads: int, factory, kwargs: dict, conn) -> None:
    import faulthandler
    import logging

    _die_with_parent()
    for end in _PARENT_ENDS:  # inherited copies would keep other workers' pipes open forever
        try:
            end.close()
        except OSError:
            pass
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
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        with contextlib.redirect_stdout(sys.stderr) if rank else contextlib.nullcontext():
            obj = factory(rank, world, **kwargs)
        conn.send(("ok", {"threads": torch.get_num_threads()}))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            name, call_kwargs = msg
            try:
                conn.send(("ok", getattr(obj, name)(**call_kwargs)))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except Exception:  # noqa: BLE001
            pass
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
        os._exit(0)


class WorkerGroup:
    """`world` forked processes with `threads` threads each, one gloo world, holding one workload
    built by `factory(rank, world, **kwargs)`; `call` runs one of its methods on every rank."""

    def __init__(self, name: str, factory, world: int = 1, threads: int = 1, timeout: float = 900.0, **kwargs):
        self.name, self.world, self.threads, self.timeout = name, world, threads, timeout
        ctx = mp.get_context("fork")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main,
                args=(rank, world, port, threads, factory, kwargs, child),
                daemon=False,
                name=f"bench-{name}-{rank}",
            )  # may start loader workers
            p.start()
            child.close()
            _PARENT_ENDS.append(parent)
            self.conns.append(parent)
            self.procs.append(p)
        self.info = self._gather()

    def _gather(self) -> list:
        results, deadline = [None] * self.world, time.monotonic() + self.timeout
        pending = set(range(self.world))
        while pending:
            for rank in list(pending):
                conn = self.conns[rank]
                if conn.poll(0.01):
                    try:
                        status, payload = conn.recv()
                    except EOFError:
                        status, payload = "error", f"rank {rank} exited without a result"
                    if status != "ok":
                        self.close()
                        raise BenchError(f"[{self.name}] {payload}")
                    results[rank] = payload
                    pending.discard(rank)
                elif not self.procs[rank].is_alive() and not conn.poll(0):
                    self.close()
                    raise BenchError(f"[{self.name}] rank {rank} died (exit code {self.procs[rank].exitcode})")
            if time.monotonic() > deadline:
                self.close()
                raise BenchError(f"[{self.name}] timed out after {self.timeout:.0f}s")
        return results

    def call(self, method: str, **kwargs) -> list:
        for conn in self.conns:
            conn.send((method, kwargs))
        return self._gather()

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                if p.is_alive():
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
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


@contextlib.contextmanager
def worker_groups(specs: dict):
    """Start every group of `specs` (name → (factory, world, threads, kwargs)); close them all after."""
    groups: dict[str, WorkerGroup] = {}
    try:
        for name, (factory, world, threads, kwargs) in specs.items():
            groups[name] = WorkerGroup(name, factory, world=world, threads=threads, **kwargs)
        yield groups
    finally:
        for group in groups.values():
            group.close()
