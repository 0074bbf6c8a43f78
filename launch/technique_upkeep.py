"""The techniques' periodic, non-differentiable work between optimizer steps: SCA's statistics
are averaged over data-parallel replicas, and HCMA's hierarchy is refreshed (and, in offline mode,
written into DeepSpeed's fp32 master weights as well as the working copy)."""
from __future__ import annotations


def upkeep(sharded, layout, step: int) -> None:
    module = sharded.module
    tech = module.tech
    if tech.sca.enabled and step > 0 and step % tech.sca.buffer_sync_every == 0:
        for sub in module.modules():
            if hasattr(sub, "sync_buffers"):
                sub.sync_buffers(sharded.dp_group)
