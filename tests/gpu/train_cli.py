"""Check-only launcher: the `loom` CLI with the default process group created as `cuda:nccl,cpu:gloo`.

`loom.launch.runtime.env.init_distributed` starts a pure NCCL default group on a GPU, where any
collective on a CPU tensor fails ("No backend type associated with device type cpu"). The GPU check
uses this launcher only after the plain CLI failed that way, to learn whether the rest of the run
(ZeRO, checkpoints, resume, export) works once CPU tensors have a backend, and reports both.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

_init_process_group = dist.init_process_group


def _mixed_backend(backend=None, *args, **kwargs):
    if backend == "nccl":
        backend = "cuda:nccl,cpu:gloo"
    return _init_process_group(backend, *args, **kwargs)


dist.init_process_group = _mixed_backend

if __name__ == "__main__":
    from loom.launch.cli import main

    sys.exit(main())
