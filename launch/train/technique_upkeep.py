"""The techniques' periodic, non-differentiable work between optimizer steps.

SCA's per-token statistics drift apart on data-parallel replicas and are averaged every
`buffer_sync_every` steps. HCMA's hierarchy is rebuilt every `refresh_every` steps on the first
stage's (vocab-parallel) embedding and made bit-identical across DP replicas; in offline mode the
aligned table is written into DeepSpeed's fp32 master weights (otherwise the next optimizer step
would silently revert it), into the working copy, and into a tied output copy on the last stage.
"""

from __future__ import annotations

import torch

from loom.model.parallel import comm
from loom.model.parallel.zero_state import gathered, set_full_fp32_param


def upkeep(sharded, layout, step: int) -> None:
    module = sharded.module
    tech = module.tech
    if tech.sca.enabled and step > 0 and step % tech.sca.buffer_sync_every == 0:
        for sub in module.modules():
            if hasattr(sub, "sync_buffers"):
                sub.sync_buffers(sharded.dp_group)
    if tech.hcma.enabled and step % tech.hcma.refresh_every == 0:
        _refresh_hcma(sharded, layout)


def _refresh_hcma(sharded, layout) -> None:
    from megatron.core import parallel_state as ps

    module, offline = sharded.module, sharded.module.tech.hcma.mode == "offline"
    new_table = None
    if module.is_first:
        weight = module.embedding.weight
        with gathered([weight]):  # ZeRO-3: the refresh needs the whole (TP-local) shard
            rows = weight.shape[0]
            start = layout.tp_rank * rows
            real = max(0, min(rows, module.cfg.vocab_size - start))
            module.hcma.refresh(weight.detach(), start, real, ps.get_tensor_model_parallel_group())
            module.hcma.broadcast_state(sharded.dp_group)
            if offline:
                new_table = module.hcma.offline_align(weight.detach())
        if new_table is not None:
            set_full_fp32_param(weight, new_table)
    if offline and module.tied_across_stages and (module.is_first or module.is_last):
        if new_table is None:
            new_table = torch.empty_like(module.output_layer.weight)
        group = sharded.embedding_group
        comm.broadcast(new_table, src=torch.distributed.get_global_rank(group, 0), group=group)
        if module.is_last:
            set_full_fp32_param(module.output_layer.weight, new_table)
