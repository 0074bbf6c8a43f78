"""In-place initialisation of a child module's parameter that also holds under ZeRO-3's zero.Init.

zero.Init partitions each module's parameters as soon as that module's constructor returns, so
`nn.init.normal_(self.proj.weight)` in a parent's constructor would only touch the local partition
(or nothing): the technique would then start from `nn.Linear`'s default init, and a zero-initialised
output map would not be zero, breaking the exact identity at init. Gathering the parameter first,
as DeepSpeed documents, keeps ZeRO-3 weights identical to every other layout's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def init_(param: nn.Parameter, fill: Callable[[torch.Tensor], object]) -> None:
    """Apply `fill` (an in-place `nn.init` function) to the whole of `param`."""
    from loom.model.parallel.zero_state import gathered_for_write

    with gathered_for_write(param):
        fill(param)


def normal_(param: nn.Parameter, std: float) -> None:
    init_(param, lambda p: nn.init.normal_(p, std=std))


def zeros_(param: nn.Parameter) -> None:
    init_(param, nn.init.zeros_)
