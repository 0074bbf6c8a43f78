"""CMR: capture gated low-rank states at source layers, reweave them into later layers per token.

docs/techniques.md (CMR) follows the paper's flowchart literally: a soft "capture state?" gate at each
source layer stores a rank-r latent of ``h^j``; at each target layer an attention over the
captured layers (of the same token) reconstructs one vector and adds it back through ``W_u = 0``,
so the model is an exact identity at init. Mixing across positions is left to the ordinary
attention of later layers, so there is no external memory and no extra KV cache.

The bank has a fixed shape ``[s, b, n_slots, r]`` so that it can cross pipeline stages with
static shapes; slots that are not captured yet (zeros) are masked out of each target's softmax.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from loom.model.precision import at_least_fp32
from loom.techniques import init
from loom.techniques.aux_loss import attach_aux_loss
from loom.techniques.normed_linear import rms_normed_linear

SlotSelection = Union[torch.Tensor, Sequence[int], None]


class LayerCapture(nn.Module):
    """``c = sigmoid(w_g . RMSNorm(h) + b_g) * W_c RMSNorm(h)``: ``[s, b, d] -> [s, b, r]`` in ``h``'s dtype."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.proj = nn.Linear(hidden_size, rank, bias=False)
        init.normal_(self.proj.weight, std=hidden_size**-0.5)
        self.gate = nn.Linear(hidden_size, 1)
        init.zeros_(self.gate.weight)
        init.zeros_(self.gate.bias)
        self._last: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # the gate logit and the rank-r state read RMSNorm(h) through one fused projection
        heads = rms_normed_linear(h, self.norm, torch.cat([self.gate.weight, self.proj.weight]))
        gate = torch.sigmoid(heads[..., :1] + at_least_fp32(self.gate.bias))  # [s, b, 1]
        with torch.no_grad():
            self._last["gate_mean"] = gate.mean()
        return (gate * heads[..., 1:]).to(h.dtype)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached 0-dim statistics of the last forward (mean capture gate)."""
        return dict(self._last)


def _selects_nothing(available: SlotSelection) -> bool:
    """An empty slot list or an all-False mask (None selects every slot)."""
    if isinstance(available, torch.Tensor) and available.dtype == torch.bool:
        return not bool(available.any())
    return available is not None and len(available) == 0


class Reweave(nn.Module):
    """``h <- h + W_u sum_j softmax_j(q . c_j / sqrt(r) + beta_j) c_j`` over the available bank slots.

    With ``rec_loss_weight > 0`` the reconstruction loss ``sum_j ||P_j c_hat - sg(c_j)||^2``
    (mean over tokens, available slots only) is attached to the output in training; the maps
    ``P_j`` start at the identity.
    """

    def __init__(self, hidden_size: int, rank: int, n_slots: int, rec_loss_weight: float = 0.0):
        super().__init__()
        self.rank, self.n_slots, self.rec_loss_weight = rank, n_slots, rec_loss_weight
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.query = nn.Linear(hidden_size, rank, bias=False)
        init.normal_(self.query.weight, std=hidden_size**-0.5)
        self.slot_bias = nn.Parameter(torch.zeros(n_slots))
        self.out = nn.Linear(rank, hidden_size, bias=False)
        init.zeros_(self.out.weight)
        if rec_loss_weight > 0:
            self.rec_maps = nn.Parameter(torch.eye(rank).repeat(n_slots, 1, 1))  # [n_slots, r, r]
        self._last: dict[str, torch.Tensor] = {}

    def _slot_mask(self, available: SlotSelection, device) -> Optional[torch.Tensor]:
        if available is None:
            return None
        if isinstance(available, torch.Tensor) and available.dtype == torch.bool:
            mask = available.to(device)
            if mask.shape != (self.n_slots,):
                raise ValueError(f"available mask must have shape ({self.n_slots},), got {tuple(mask.shape)}")
        else:
            slots = [int(i) for i in available]
            if any(not 0 <= i < self.n_slots for i in slots):
                raise ValueError(f"available slots {slots} must be a subset of 0..{self.n_slots - 1}")
            mask = torch.zeros(self.n_slots, dtype=torch.bool, device=device)
            mask[slots] = True
        return mask

    def forward(
        self, h: torch.Tensor, bank: torch.Tensor, available: SlotSelection = None, loss_share: float = 1.0
    ) -> torch.Tensor:
        """``bank`` is ``[s, b, n_slots, r]``; ``available`` (bool ``[n_slots]`` or slot indices,
        None = all) names the slots already captured; the others get zero attention. With no
        available slot (a stage-local target whose stage captures no source) the reweave is skipped:
        the output is ``h`` itself. Under sequence parallelism ``loss_share`` is this shard's fraction of
        the tokens, so the shards' reconstruction losses add up to the unsharded one."""
        if bank.shape[2] != self.n_slots:
            raise ValueError(f"bank has {bank.shape[2]} slots, this Reweave expects {self.n_slots}")
        if _selects_nothing(available):
            self._last = {}
            return h
        mask = self._slot_mask(available, h.device)
        bank_f = at_least_fp32(bank)
        query = rms_normed_linear(h, self.norm, self.query.weight)
        logits = torch.einsum("sbr,sbnr->sbn", query, bank_f) * self.rank**-0.5 + at_least_fp32(self.slot_bias)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(-1)
        rebuilt = torch.einsum("sbn,sbnr->sbr", weights, bank_f)
        out = h + self.out(rebuilt.to(h.dtype))
        if self.rec_loss_weight > 0 and self.training and torch.is_grad_enabled():
            rec = self._reconstruction_loss(rebuilt, bank_f.detach(), mask)
            out = attach_aux_loss(out, self.rec_loss_weight * loss_share * rec)
            self._last["rec_loss"] = rec.detach()
        with torch.no_grad():
            entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
            self._last["attn_entropy"] = entropy.mean()
            slot_means = weights.reshape(-1, self.n_slots).mean(0)
            for slot in range(self.n_slots):
                self._last[f"attn_weight_slot{slot}"] = slot_means[slot]
        return out

    def _reconstruction_loss(
        self, rebuilt: torch.Tensor, bank: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        decoded = torch.einsum("sbr,nqr->sbnq", rebuilt, at_least_fp32(self.rec_maps))  # P_j c_hat for every slot
        per_slot = (decoded - bank).pow(2).sum(-1)  # [s, b, n_slots]
        if mask is not None:
            per_slot = per_slot * mask.to(per_slot.dtype)
        return per_slot.sum(-1).mean()

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached 0-dim statistics of the last forward (attention entropy, mean weight per slot)."""
        return dict(self._last)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, n_slots={self.n_slots}, rec_loss_weight={self.rec_loss_weight}"
