"""Attention maps for the AHD family: probabilities recomputed from each attention module's inputs
by a forward hook on the stage that owns the layer, reduced over heads across the TP group."""

from __future__ import annotations

from typing import Any

import torch

from loom.launch.eval.settings import batches_of
from loom.model.parallel import comm
from loom.techniques.metrics import attention as attn_m


class AttentionPass:
    """Part of `launch.eval_runner.Evaluator`."""

    def attention(self) -> None:
        s, stream = self.seq, self.held.stream
        n = min(self.s.ahd_rows, len(stream) // (s + 1))
        rows_all = stream[: n * (s + 1)].reshape(n, s + 1)
        q = min(self.s.ahd_queries, s)
        g = torch.Generator().manual_seed(self.s.seed)
        qpos = torch.randperm(s, generator=g)[:q].sort().values
        heads = self.m.cfg.model.num_heads
        tp_group = self.m.tp_group
        for chunk in batches_of(self.mine(n), self.s.batch_size):
            maps: dict[int, Any] = {}
            handles = []
            for idx, block in self.m.module.layers.items():

                def hook(mod, inputs, output, layer=int(idx) + 1):
                    probs = attention_maps(mod, *inputs, qpos)  # [b, h_local, Q, s]
                    mean = attn_m.head_sum(probs)
                    if self.m.layout.tp > 1:
                        comm.all_reduce(mean, group=tp_group)
                    mean = mean / heads
                    disp = attn_m.dispersion_sum(probs, mean)
                    if self.m.layout.tp > 1:
                        comm.all_reduce(disp, group=tp_group)
                    maps[layer] = (mean.float(), float(disp), probs.shape[0] * heads * probs.shape[2])

                handles.append(block.attention.register_forward_hook(hook))
            try:
                self.m.forward(rows_all[chunk])
            finally:
                for h in handles:
                    h.remove()
            if self.m.reports_hidden:
                for layer, (mean, disp, count) in maps.items():
                    for r, i in enumerate(chunk):
                        self.record("attn", (i, layer, mean[r], disp / len(chunk), count // len(chunk)))


def attention_maps(mod, x, cos, sin, query_positions):
    """Attention probabilities `[b, h_local, Q, s]` of this rank's heads for the selected queries,
    from the attention module's own q and k (`Attention.rotated_qkv`) and an explicit causal
    softmax (SDPA does not return its probabilities)."""
    q, k, _ = mod.rotated_qkv(x, cos, sin)
    k = k.repeat_interleave(mod.q_per_group, dim=2)
    q, k = (t.permute(1, 2, 0, 3) for t in (q, k))
    return attn_m.attention_probabilities(q, k, query_positions.to(x.device))
