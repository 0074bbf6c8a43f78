"""SwiGLU feed-forward, tensor-parallel over the inner width.

The fused gate/up weight interleaves rows (gate_0, up_0, gate_1, up_1, …) so a contiguous split
over TP ranks keeps every gate row beside its up row: the same weight means the same network at
any TP size.
"""
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from model.attention import _no_init
from model.config import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_config):
        super().__init__()
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_size, config=layer_config,
                                            init_method=_no_init, bias=False, gather_output=False)
        self.down = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, config=layer_config, init_method=_no_init,
                                      bias=False, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up(x)
        gate, up = gate_up.unflatten(-1, (-1, 2)).unbind(-1)
        y, _ = self.down(F.silu(gate) * up)
        return y
