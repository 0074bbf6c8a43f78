"""One pre-norm transformer block and the points where the techniques plug in.

    x1 = h + Attn(RMSNorm(h))      ── post_attn point (SCR default, LCM alternative)
    x2 = x1 + MLP(RMSNorm(x1))     ── post_mlp point  (LCM default, SCR alternative)
    h' = x2                        ── residual point h^ℓ: CMR reweave (target), CMR capture (source),
                                      SCA head (aux loss attached to h^ℓ)

Activation checkpointing recomputes the attention and MLP sub-blocks only, so the techniques'
forward side effects (SCA's EMA update) never run twice.

At inference the same forward takes the stage's `InferenceCache` (`model/inference.py`): attention
appends to the block's keys and values, LCM and SCR fill their state from the prompt and then continue
one token at a time from it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loom.model.attention import Attention
from loom.model.config import ModelConfig
from loom.model.context import ForwardContext
from loom.model.inference import BlockCache, InferenceCache, KVCache
from loom.model.mlp import SwiGLU
from loom.model.norm import RMSNorm
from loom.model.technique_plan import TechniquePlan
from loom.techniques.aux_loss import attach_aux_loss
from loom.techniques.cmr import LayerCapture, Reweave
from loom.techniques.config import TechniquesConfig
from loom.techniques.lcm import LCM
from loom.techniques.sca import SCAHead
from loom.techniques.scr import SCR, SCRCarry


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, tech: TechniquesConfig, plan: TechniquePlan, index: int, layer_config, tp: int
    ):
        super().__init__()
        d = cfg.hidden_size
        self.point = index + 1  # this block outputs h^(index+1)
        self.checkpointing = cfg.activation_checkpointing
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attention = Attention(cfg, layer_config, tp)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, layer_config)

        self.lcm = LCM(d, tech.lcm) if index in plan.lcm_blocks else None
        self.lcm_placement = tech.lcm.placement
        self.scr = SCR(d, tech.scr) if index in plan.scr_blocks else None
        self.scr_placement = tech.scr.placement
        self.scr_first = bool(plan.scr_blocks) and index == plan.scr_blocks[0]
        n_slots = len(plan.cmr_sources)
        self.reweave = (
            Reweave(d, tech.cmr.rank, n_slots, tech.cmr.rec_loss_weight) if self.point in plan.cmr_targets else None
        )
        self.capture = LayerCapture(d, tech.cmr.rank) if self.point in plan.cmr_sources else None
        self.capture_slot = plan.cmr_sources.index(self.point) if self.capture is not None else None
        self.sca = SCAHead(d, cfg.vocab_size, tech.sca) if self.point in plan.sca_points else None

    def _attention_residual(self, h, cos, sin):
        return h + self.attention(self.attn_norm(h), cos, sin)

    def _mlp_residual(self, x):
        return x + self.mlp(self.mlp_norm(x))

    def _modulate(
        self, h: torch.Tensor, ctx: ForwardContext, placement: str, state: Optional[BlockCache] = None
    ) -> torch.Tensor:
        if self.scr is not None and self.scr_placement == placement:
            carry = state.scr if state is not None else None
            h, ctx.rho = self.scr(h, ctx.start, None if self.scr_first else ctx.rho, carry, ctx.sequence)
        if self.lcm is not None and self.lcm_placement == placement:
            halo = ctx.sequence.previous_rows(h, self.lcm.K) if ctx.sequence is not None else None
            h = self.lcm(h, ctx.pos, state.lcm if state is not None else None, halo, ctx.token_share)
        return h

    def new_cache(self, reserve: int = 0) -> BlockCache:
        """This block's empty inference state: keys and values, plus LCM's window and SCR's sums if here."""
        return BlockCache(
            KVCache(reserve),
            lcm=self.lcm.new_window() if self.lcm is not None else None,
            scr=SCRCarry() if self.scr is not None else None,
        )

    def forward(self, h: torch.Tensor, ctx: ForwardContext, cache: Optional[InferenceCache] = None) -> torch.Tensor:
        if cache is not None:
            state = cache.block(self.point - 1, lambda: self.new_cache(cache.reserve))
            x = h + self.attention(self.attn_norm(h), ctx.cos, ctx.sin, state.kv, cache.chunk)
            x = self._mlp_residual(self._modulate(x, ctx, "post_attn", state))
            return residual_point(self, self._modulate(x, ctx, "post_mlp", state), ctx)
        if self.checkpointing and torch.is_grad_enabled():
            x = checkpoint(self._attention_residual, h, ctx.cos, ctx.sin, use_reentrant=False)
            x = self._modulate(x, ctx, "post_attn")
            x = checkpoint(self._mlp_residual, x, use_reentrant=False)
        else:
            x = self._modulate(self._attention_residual(h, ctx.cos, ctx.sin), ctx, "post_attn")
            x = self._mlp_residual(x)
        x = self._modulate(x, ctx, "post_mlp")
        return residual_point(self, x, ctx)


def residual_point(owner: nn.Module, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """CMR reweave/capture and the SCA head at h^point; shared by blocks and the embedding (h^0)."""
    if getattr(owner, "reweave", None) is not None:
        h = owner.reweave(h, ctx.bank_tensor(), ctx.readable_slots(owner.point), ctx.token_share)
    if getattr(owner, "capture", None) is not None:
        ctx.bank[owner.capture_slot] = owner.capture(h)
    if getattr(owner, "sca", None) is not None and ctx.training:
        if ctx.sequence is None:
            loss = owner.sca(h, ctx.tokens, ctx.doc, step=ctx.step, update_ema=ctx.update_ema)
        else:  # the head sees the whole micro-batch, as without sharding (SCAHead.forward)
            loss = owner.sca(h, ctx.full_tokens, ctx.full_doc, ctx.step, ctx.update_ema, gather=ctx.sequence.gather)
        h = attach_aux_loss(h, loss)
    return h
