"""`F.linear(RMSNorm(h), W)` for the techniques' narrow heads, without materialising `RMSNorm(h)`.

Every technique reads the residual stream through an RMSNorm followed by a projection to a few
(1 … rank) outputs. Normalising first writes, and backward later reads, a full `[s, b, d]` tensor
per head; folding the norm's gain into the small weight and scaling the narrow output by the
per-token `1/RMS(h)` computes the same function (the norm is linear once the scale is fixed) with
one reduction over `h` instead. Always fp32, like the RMSNorm it replaces.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from loom.model.precision import at_least_fp32


def rms_normed_linear(
    h: torch.Tensor, norm: nn.RMSNorm, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`F.linear(norm(h), weight, bias)` in fp32: `[..., d] -> [..., out]`."""
    hf = at_least_fp32(h)
    mean_square = torch.linalg.vector_norm(hf, dim=-1, keepdim=True).square() / hf.shape[-1]
    out = F.linear(hf, at_least_fp32(weight) * at_least_fp32(norm.weight)) * torch.rsqrt(mean_square + norm.eps)
    return out if bias is None else out + at_least_fp32(bias)
