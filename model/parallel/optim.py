"""The optimizer: its configuration (`optim.*`) and the AdamW Loom builds from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.model.parallel.zero_state import local_shape


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to the peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (vectors such as norms are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over TP, PP and DP) to this value; 0 disables clipping."""


def build_optimizer(module: torch.nn.Module, opt: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with no decay on vectors (norms, gates, technique scalars), as Megatron does."""

    def ndim(p):
        return len(local_shape(p))

    decay = [p for p in module.parameters() if p.requires_grad and ndim(p) >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels are missing for some device/dtype pairs
        return torch.optim.AdamW(groups, **kwargs)
