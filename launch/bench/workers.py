"""The benchmark's worker groups (the fork harness of `loom.launch.runtime.fork`): each configuration gets
its own processes, threads, gloo world and memory, and waits on a pipe while the others run."""

from __future__ import annotations

import contextlib
import warnings

from loom.launch.runtime.fork import WorkerGroup


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
