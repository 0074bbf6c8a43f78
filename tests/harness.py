"""Run a function in N gloo processes (OLMo-core's `run_distributed_test` idea), through the fork
harness `loom bench` uses too (`loom.launch.runtime.fork`).

Children are forked from the pytest process after it has imported torch, megatron-core and DeepSpeed
once (`preimport_heavy_modules`), which saves 6-20 s of imports per rank on 2 cores. Each child runs
single-threaded with a short collective timeout, and its return value (or its traceback) travels back
through a pipe, so a failure in one rank fails the test with that rank's own traceback instead of a hang.
"""

from __future__ import annotations

from typing import Any, Callable

from loom.launch.runtime.fork import WorkerError, run_once


class DistributedTestError(AssertionError):
    """A rank raised, died, or the group did not finish in time."""


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


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout: float = 300.0,
    collective_timeout: float = 120.0,
    **kwargs,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` in `world_size` forked processes; the per-rank return
    values (they must pickle). Raises DistributedTestError with the first failing rank's traceback, or
    when a rank exits without reporting, or on timeout."""
    try:
        return run_once(
            fn, world_size, *args, timeout=timeout, collective_timeout=collective_timeout, backend=backend, **kwargs
        )
    except WorkerError as exc:
        raise DistributedTestError(str(exc)) from None
