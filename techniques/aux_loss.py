"""Inject an auxiliary loss produced mid-network into the backward pass of the main loss.

A pipeline stage other than the last cannot add its loss to the final loss. Following
Megatron-Core's ``MoEAuxLossAutoScaler``, the aux loss rides on a hidden state that continues
through the network: the forward pass returns the hidden state untouched, and the backward pass
seeds the aux loss with the same scale the main loss is back-propagated with (1/num_microbatches,
times the fp16 loss scale if any). The trainer sets that scale once per step.
"""

from __future__ import annotations

from typing import Union

import torch

_scale: Union[float, torch.Tensor] = 1.0


def set_aux_loss_scale(scale: Union[float, torch.Tensor]) -> None:
    """Gradient seeded into every attached aux loss; must equal the main loss's backward scale."""
    global _scale
    _scale = scale.detach() if isinstance(scale, torch.Tensor) else float(scale)


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = _scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=aux_loss.device, dtype=aux_loss.dtype)
        return grad_hidden, torch.ones_like(aux_loss) * scale


def attach_aux_loss(hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    """Return ``hidden`` unchanged; backward through it also back-propagates ``scale * aux_loss``.

    Use the returned tensor downstream (not the original), otherwise the aux loss is dropped.
    """
    return _AttachAuxLoss.apply(hidden, aux_loss)
