"""Causal self-attention with grouped-query heads, tensor-parallel over heads.

The fused QKV weight is laid out per key/value group — [q heads of group g, k_g, v_g] for each g —
so that a contiguous split over TP ranks hands every rank whole groups, and a TP=1 weight means
the same network at any TP size.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from loom.model.config import ModelConfig
from loom.model.inference import Chunk, KVCache
from loom.model.rope import apply_rotary


def _no_init(weight):
    """Weights are written afterwards by `model.init`, identically for every layout."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_config, tp: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.kv_groups = cfg.kv_heads // tp
        self.q_per_group = cfg.num_heads // cfg.kv_heads
        qkv_out = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_out, config=layer_config, init_method=_no_init, bias=False, gather_output=False
        )
        self.proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim,
            cfg.hidden_size,
            config=layer_config,
            init_method=_no_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """This rank's q `[s, b, heads, head_dim]` and k, v `[s, b, kv_groups, head_dim]`, RoPE applied."""
        qkv, _ = self.qkv(x)
        s, b = qkv.shape[:2]  # the whole sequence under sequence parallelism, where x holds a shard of it
        qkv = qkv.view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
        # split, not slicing: split's backward is one concatenation, while every slice's backward
        # would zero-fill a full qkv-sized gradient; RoPE runs once over q and k together
        qk, v = qkv.split([self.q_per_group + 1, 1], dim=3)
        qk = apply_rotary(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k = qk.split([self.q_per_group, 1], dim=3)
        return q.reshape(s, b, -1, self.head_dim), k.squeeze(3), v.squeeze(3)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: Optional[KVCache] = None,
        chunk: Optional[Chunk] = None,
    ) -> torch.Tensor:
        """Causal attention over `x` `[s, b, d]`. At inference, `kv` keeps this block's keys and values
        and `chunk` says where the new ones go and which cached positions each query may see."""
        q, k, v = self.rotated_qkv(x, cos, sin)
        s, b = q.shape[:2]
        # SDPA wants [b, h, s, head_dim]; it never materialises the [s, s] scores on the fast paths
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_per_group > 1)
        else:
            k, v = kv.append(k, v, chunk.offset)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=chunk.attn_mask, is_causal=chunk.causal, enable_gqa=self.q_per_group > 1
            )
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        y, _ = self.proj(out)
        return y
