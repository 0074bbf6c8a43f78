"""Rotary position embedding in Hugging Face's split-half ("rotate_half") layout, so that exporting
to `LlamaForCausalLM` is a pure rename with no q/k row permutation."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        """cos and sin tables of shape [s, 1, 1, head_dim] for the [s, b, h, head_dim] layout."""
        cached = self._cache
        if cached is None or cached[0] < seq_len or cached[1] != device or cached[2] != dtype:
            freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
            cached = (seq_len, device, dtype, emb.cos().to(dtype), emb.sin().to(dtype))
            self._cache = cached
        return cached[3][:seq_len], cached[4][:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1]. The sign is folded into the small
    sin table ([-x2]·s == x2·[-s] exactly) and the halves come from `chunk`, whose backward is one
    concatenation; slicing would cost a zero-filled full-size gradient per slice. Bit-identical to
    the textbook form."""
    x1, x2 = x.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * torch.cat([-s1, s2], dim=-1)
