"""Greedy text generation through the parallel model (any TP/PP layout), for the samples a
training run prints. No KV cache: each new token re-runs the prefix, which is fine for samples."""

from __future__ import annotations

import torch
import torch.distributed as dist

from loom.model.parallel.pipeline import forward_only


@torch.no_grad()
def greedy_generate(
    module, prompt_ids: list[int], max_new_tokens: int, dtype: torch.dtype, device: torch.device
) -> list[int]:
    """Collective over the model-parallel ranks of one DP replica; every rank returns the same ids."""
    from megatron.core import parallel_state as ps

    pp_group, tp_group = ps.get_pipeline_model_parallel_group(), ps.get_tensor_model_parallel_group()
    last_stage = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
    was_training = module.training
    module.eval()
    ids = list(prompt_ids)
    limit = module.cfg.seq_length
    for _ in range(max_new_tokens):
        window = ids[-limit:]
        tokens = torch.tensor([window + [0]], device=device)  # the label column is unused
        specs = module.carry_specs(1, len(window), dtype)
        out = forward_only(lambda mb, rec: module(mb, rec, return_logits=True), [tokens], pp_group, specs, device)
        next_id = torch.zeros(1, dtype=torch.long, device=device)
        if out:
            local = out[0][-1, 0].float()  # [V_pad / tp]
            best = torch.stack(
                [local.max(), local.argmax().float() + ps.get_tensor_model_parallel_rank() * local.numel()]
            )
            gathered = [torch.empty_like(best) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(gathered, best, group=tp_group)
            winner = max(gathered, key=lambda t: float(t[0]))
            next_id[0] = int(winner[1])
        dist.broadcast(next_id, src=last_stage, group=pp_group)
        ids.append(int(next_id))
        if int(next_id) == module.cfg.eos_id:
            break
    module.train(was_training)
    return ids
