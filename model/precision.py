"""The fp32 islands of a low-precision model, and float64.

bf16 runs compute norms, the loss and the techniques' small statistics in float32 (`.float()`). The
layout-equivalence tests build the whole model in float64 (`parallelize(..., precision="fp64")`) so a
different reduction order between layouts stays at rounding level whatever the CPU's kernels; there an
island must keep float64 instead of rounding every value to float32 and back.
"""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x.float()`, except that float64 stays float64 (bf16 and fp32 behave exactly as `.float()`)."""
    return x if x.dtype == torch.float64 else x.float()
