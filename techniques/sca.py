"""SCA: a training-only auxiliary loss that aligns contextual states with per-token statistics.

docs/techniques.md (SCA) turns the withdrawn paper's "tensor field" into an EMA field (mean and diagonal
variance per token type) of projected states, plus a windowed InfoNCE over co-occurring tokens
and a variance/covariance anti-collapse term. The forward pass of the model is unchanged; the
caller attaches the returned loss to the hidden state with ``attach_aux_loss``.

Everything is written without data-dependent shapes (no ``unique``/boolean indexing), so the head
never forces a host-device synchronisation in the middle of a pipelined forward pass. The EMA
runs as a dense update over the vocabulary in which rows absent from the micro-batch get a zero
rate and stay bit-identical.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from loom.model.parallel import comm
from loom.model.precision import at_least_fp32
from loom.techniques import init
from loom.techniques.config import SCAConfig

_FIELD_BUFFERS = ("mu", "var", "cnt")


def _fp32_filled(shape: tuple[int, ...], value: float) -> torch.Tensor:
    """An fp32 tensor of `value`. Under DeepSpeed's ZeRO-3 `zero.Init` every tensor constructor returns the
    run's half dtype (bf16 counts stop at 256); `.float()` and `fill_` are not intercepted, so the
    statistics stay fp32 and exact whatever context the module is built in."""
    return torch.empty(shape).float().fill_(value)


class SCAHead(nn.Module):
    """``forward(h, tokens, doc, step)`` -> ``lambda_f L_field + lambda_c L_coh + lambda_v L_vc`` (fp32 scalar).

    ``h`` is ``[s, b, d]``, ``tokens`` and ``doc`` are ``[s, b]``. The field buffers ``mu``,
    ``var`` (``[V, r]``) and ``cnt`` (``[V]``) stay fp32 even if the module is cast to bf16.
    """

    def __init__(self, hidden_size: int, vocab_size: int, cfg: SCAConfig):
        super().__init__()
        self.rank, self.window, self.tau = cfg.rank, cfg.window, cfg.tau
        self.ema_beta, self.warmup_steps, self.var_floor_count = cfg.ema_beta, cfg.warmup_steps, cfg.var_floor_count
        self.lambda_field, self.lambda_coh, self.lambda_vc = cfg.lambda_field, cfg.lambda_coh, cfg.lambda_vc
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.proj = nn.Linear(hidden_size, cfg.rank, bias=False)
        init.normal_(self.proj.weight, std=hidden_size**-0.5)
        self.register_buffer("mu", _fp32_filled((vocab_size, cfg.rank), 0.0), persistent=True)
        self.register_buffer("var", _fp32_filled((vocab_size, cfg.rank), 1.0 / cfg.rank), persistent=True)
        self.register_buffer("cnt", _fp32_filled((vocab_size,), 0.0), persistent=True)
        self._last: dict[str, torch.Tensor] = {}

    def _apply(self, fn, recurse: bool = True):
        # Follow device moves but never a dtype cast: bf16 counts and statistics would be wrong.
        saved = {name: self._buffers[name] for name in _FIELD_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = old.to(device=self._buffers[name].device)
        return self

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 states ``z = normalize(W_z RMSNorm(h))``, ``[s, b, r]``."""
        weight = at_least_fp32(self.norm.weight)
        u = F.rms_norm(at_least_fp32(h), self.norm.normalized_shape, weight, self.norm.eps).to(h.dtype)
        return F.normalize(at_least_fp32(self.proj(u)), dim=-1)

    def forward(
        self,
        h: torch.Tensor,
        tokens: torch.Tensor,
        doc: torch.Tensor,
        step: int,
        update_ema: bool = True,
        gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Pass ``update_ema=False`` when the forward is recomputed, so the EMA runs once per micro-batch.

        Under sequence parallelism ``h`` is one shard of the sequence, ``tokens`` and ``doc`` are the whole
        sequence's, and ``gather`` collects the shards' projections ``[s/n, b, r]`` into ``[s, b, r]``
        (autograd-aware): every rank then computes the loss and the field update of the whole micro-batch,
        as without sharding (r values per token cross ranks, not d)."""
        z = self.project(h)
        if gather is not None:
            z = gather(z)
        flat, ids = z.reshape(-1, self.rank), tokens.reshape(-1)
        l_field = self._field_loss(flat, ids)
        l_coh = self._coherence_loss(z, doc)
        l_vc = self._anti_collapse_loss(flat)
        lambda_field = self.lambda_field if step >= self.warmup_steps else 0.0
        total = lambda_field * l_field + self.lambda_coh * l_coh + self.lambda_vc * l_vc
        if update_ema:
            self.update_field(flat.detach(), ids)
        self._last = {
            "l_field": l_field.detach(),
            "l_coh": l_coh.detach(),
            "l_vc": l_vc.detach(),
            "loss": total.detach(),
        }
        return total

    def _field_loss(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        count = self.cnt[ids]
        var = self.var[ids]
        if self.var_floor_count > 0:
            young = (count < self.var_floor_count)[:, None]
            var = torch.where(young, var.clamp_min(1.0 / self.rank), var)
        whitened = ((z - self.mu[ids]) / var.clamp_min(1e-4).sqrt()).pow(2).mean(-1)
        seen = (count > 0).to(z.dtype)
        return (whitened * seen).sum() / seen.sum().clamp_min(1.0)

    def _anti_collapse_loss(self, z: torch.Tensor) -> torch.Tensor:
        r = self.rank
        centred = z - z.mean(0)
        std = centred.pow(2).mean(0).add(1e-6).sqrt()
        cov = centred.T @ centred / max(z.shape[0] - 1, 1)
        corr = cov / (std[:, None] * std[None, :])
        off_diagonal = corr.masked_fill(torch.eye(r, dtype=torch.bool, device=z.device), 0.0)
        return F.relu(1.0 - math.sqrt(r) * std).mean() + off_diagonal.pow(2).sum() / (r * (r - 1))

    def _coherence_loss(self, z: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        s, b, r = z.shape
        W = self.window
        n = s // W
        if n == 0:
            return z.sum() * 0.0
        chunks = z[: n * W].reshape(n, W, b, r).permute(2, 0, 1, 3).reshape(b * n, W, r)
        chunk_docs = doc[: n * W].reshape(n, W, b).permute(2, 0, 1).reshape(b * n, W)
        valid = (chunk_docs == chunk_docs[:, :1]).all(1)  # chunk lies inside one document
        anchor = F.normalize(chunks[:, : W // 2].mean(1), dim=-1)
        positive = F.normalize(chunks[:, W // 2 :].mean(1), dim=-1)
        first_doc, row = chunk_docs[:, 0], torch.arange(b, device=z.device).repeat_interleave(n)
        eye = torch.eye(b * n, dtype=torch.bool, device=z.device)
        same_doc = (first_doc[:, None] == first_doc[None, :]) & (row[:, None] == row[None, :]) & ~eye
        logits = (anchor @ positive.T / self.tau).masked_fill(same_doc | ~valid[None, :], float("-inf"))
        # Invalid anchors get a finite dummy row and zero weight, keeping shapes static and grads finite.
        logits = torch.where(valid[:, None], logits, torch.zeros((), dtype=logits.dtype, device=z.device))
        per_chunk = F.cross_entropy(logits, torch.arange(b * n, device=z.device), reduction="none")
        weight = valid.to(per_chunk.dtype)
        return (per_chunk * weight).sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def update_field(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        """One bias-corrected EMA step of the field from ``z [N, r]`` (fp32) observed at token ``ids [N]``."""
        z = z.float()
        n = torch.zeros_like(self.cnt).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        per_row = n.clamp_min(1.0)[:, None]
        mean = torch.zeros_like(self.mu).index_add_(0, ids, z) / per_row
        mean_sq = torch.zeros_like(self.mu).index_add_(0, ids, z * z) / per_row
        rate = torch.maximum(torch.full_like(n, 1.0 - self.ema_beta), 1.0 / (self.cnt + 1.0))
        rate = (rate * (n > 0))[:, None]  # absent token types keep their statistics exactly
        self.mu += rate * (mean - self.mu)
        self.var += rate * ((mean_sq - mean * mean).clamp_min(0) + (mean - self.mu) ** 2 - self.var)
        self.cnt += n

    @torch.no_grad()
    def sync_buffers(self, group: Optional[dist.ProcessGroup]) -> None:
        """All-reduce-average ``mu``, ``var`` and ``cnt`` over ``group``; no-op without a group of size > 1."""
        if group is None or not dist.is_available() or not dist.is_initialized():
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        for name in _FIELD_BUFFERS:
            buffer = getattr(self, name)
            comm.all_reduce(buffer, group=group)
            buffer.div_(world)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached 0-dim loss terms of the last forward (``l_field``, ``l_coh``, ``l_vc``, weighted ``loss``)."""
        return dict(self._last)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, vocab={self.cnt.numel()}, window={self.window}, tau={self.tau}"
