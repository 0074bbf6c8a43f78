"""Full, unsharded weights of a model spread over TP and PP ranks (and ZeRO-3 partitions).

Every rank gets the same `{name: fp32 CPU tensor}` dict, named as in a TP=1, PP=1 model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from loom.model.parallel import comm
from loom.model.parallel.zero_state import gathered
from loom.model.precision import at_least_fp32


@torch.no_grad()
def full_state_dict(module: torch.nn.Module, include_buffers: bool = True) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    local: dict[str, torch.Tensor] = {}
    with gathered(module.parameters()):
        for name, param in module.named_parameters():
            value = param.detach()
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                value = torch.cat(comm.all_gather(value, group=tp_group), dim=param.partition_dim)
            local[name] = at_least_fp32(value).cpu().clone()
    if include_buffers:  # persistent buffers only (SCA statistics, HCMA state), not RoPE tables
        params = dict(module.named_parameters())
        for name, value in module.state_dict().items():
            if name not in params and not name.endswith("_extra_state") and torch.is_tensor(value):
                local[name] = value.detach().cpu().clone()
    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) == 1:
        return local
    stages = comm.all_gather_object(local, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for stage_dict in stages:
        merged.update(stage_dict)
    if getattr(module, "tied_across_stages", False):
        # the last stage's copy of a tied embedding: identical by construction, so not a weight of its own
        copy = merged.pop("output_layer.weight")
        if not torch.allclose(copy, merged["embedding.weight"], rtol=1e-5, atol=1e-6):
            raise RuntimeError("the tied output copy on the last stage has drifted from the embedding")
    return merged
