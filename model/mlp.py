"""SwiGLU feed-forward, tensor-parallel over the inner width.

The fused gate/up weight interleaves rows (gate_0, up_0, gate_1, up_1, …) so a contiguous split
over TP ranks keeps every gate row beside its up row: the same weight means the same network at
any TP size.
"""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from loom.model.attention import _no_init
from loom.model.config import ModelConfig
from loom.model.parallel.zero_state import mark_zero3_leaf


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_config):
        super().__init__()
        self.gate_up = ColumnParallelLinear(
            cfg.hidden_size,
            2 * cfg.ffn_size,
            config=layer_config,
            init_method=_no_init,
            bias=False,
            gather_output=False,
        )
        self.down = RowParallelLinear(
            cfg.ffn_size,
            cfg.hidden_size,
            config=layer_config,
            init_method=_no_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

        # ZeRO-3 gathers parameters per module as its forward starts; forward reads gate_up's weight
        # before calling gate_up, so the whole SwiGLU is one ZeRO-3 unit (DeepSpeed's "leaf module")
        mark_zero3_leaf(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Multiply by the weight with its rows regrouped [all gate rows; all up rows] (a small copy,
        # differentiable) instead of splitting the interleaved output: silu and the product then run
        # on contiguous halves, which is vectorised, where stride-2 halves take a scalar loop.
        weight = self.gate_up.weight
        inner = weight.shape[0] // 2
        grouped = weight.view(inner, 2, weight.shape[1]).transpose(0, 1).reshape(2 * inner, weight.shape[1])
        gate_up, _ = self.gate_up(x, weight=grouped)
        gate, up = gate_up.chunk(2, dim=-1)
        y, _ = self.down(F.silu(gate) * up)
        return y
