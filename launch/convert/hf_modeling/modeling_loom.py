"""A Loom model for Hugging Face `transformers` (remote code), written by `loom convert to-hf --remote-code`.

Self-contained plain PyTorch: the same network as Loom's training code at TP=1, PP=1 — a Llama-style
pre-norm decoder (fp32 RMSNorm, split-half RoPE, grouped-query attention with a fused per-group QKV
weight, SwiGLU with an interleaved fused gate/up weight) plus the techniques that change the forward
pass: LCM (Latent Convergence Modulation), SCR (Structured Context Recomposition) and CMR
(Contextual Memory Reweaving). SCA is training-only and HCMA lives in the embedding table, so
neither needs code here. Weight names equal Loom's own (`layers.3.lcm.alpha`, …).

LCM and SCR live in `techniques_loom.py`. Generation uses transformers' cache (`use_cache=True`, the
default): `cache_loom.py`'s layers carry the keys and values plus LCM's window of the last K states and
SCR's decayed sums, so a new token costs O(1) in the prefix length apart from attention. Batches may be
left-padded (`attention_mask`); documents restart after `document_eos_id` exactly as in training.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_loom import Documents, loom_layers
from .configuration_loom import LoomConfig
from .techniques_loom import LCM, SCR


# ----------------------------------------------------------------------------- core layers
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_at(positions, head_dim: int, theta: float, dtype):
    """cos, sin [s, b, 1, head_dim] of the RoPE positions [s, b]."""
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    """Fused QKV rows per key/value group g: [q heads of g, k_g, v_g]."""

    def __init__(self, cfg: LoomConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.kv_groups = cfg.num_key_value_heads
        self.q_per_group = cfg.num_attention_heads // cfg.num_key_value_heads
        out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, out, bias=False)
        self.proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, layer=None, mask=None, causal=True):
        """x [s, b, d]; with a cache `layer`, the new keys and values join the cached ones and `mask`
        (or `causal`) says which of them each query sees."""
        s, b, _ = x.shape
        qkv = self.qkv(x).view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(s, b, -1, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if layer is not None:
            k, v = layer.update(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=self.q_per_group > 1
        )
        return self.proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))


class SwiGLU(nn.Module):
    """Fused gate/up rows interleaved: gate_0, up_0, gate_1, up_1, …"""

    def __init__(self, cfg: LoomConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).unflatten(-1, (-1, 2)).unbind(-1)
        return self.down(F.silu(gate) * up)


def _rms_norm_fp32(norm: nn.RMSNorm, h):
    return F.rms_norm(h.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(h.dtype)


# ----------------------------------------------------------------------------- CMR
class LayerCapture(nn.Module):
    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.proj = nn.Linear(hidden_size, rank, bias=False)
        self.gate = nn.Linear(hidden_size, 1)

    def forward(self, h):
        u = _rms_norm_fp32(self.norm, h)
        gate = torch.sigmoid(F.linear(u.float(), self.gate.weight.float(), self.gate.bias.float()))
        return (gate * self.proj(u).float()).to(h.dtype)


class Reweave(nn.Module):
    def __init__(self, hidden_size: int, rank: int, n_slots: int):
        super().__init__()
        self.rank, self.n_slots = rank, n_slots
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.query = nn.Linear(hidden_size, rank, bias=False)
        self.slot_bias = nn.Parameter(torch.zeros(n_slots))
        self.out = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, h, bank, readable):
        mask = torch.zeros(self.n_slots, dtype=torch.bool, device=h.device)
        mask[list(readable)] = True
        bank_f = bank.float()
        query = self.query(_rms_norm_fp32(self.norm, h)).float()
        logits = torch.einsum("sbr,sbnr->sbn", query, bank_f) * self.rank**-0.5 + self.slot_bias.float()
        weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        rebuilt = torch.einsum("sbn,sbnr->sbr", weights, bank_f)
        return h + self.out(rebuilt.to(h.dtype))


# ----------------------------------------------------------------------------- blocks
class Block(nn.Module):
    def __init__(self, cfg: LoomConfig, index: int):
        super().__init__()
        d, t = cfg.hidden_size, cfg.techniques or {}
        self.point = index + 1
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        lcm, scr, cmr = t.get("lcm"), t.get("scr"), t.get("cmr")
        self.lcm = LCM(d, lcm) if lcm and index in lcm["blocks"] else None
        self.lcm_placement = lcm["placement"] if lcm else None
        self.scr = SCR(d, scr) if scr and index in scr["blocks"] else None
        self.scr_placement = scr["placement"] if scr else None
        self.scr_first = bool(scr) and bool(scr["blocks"]) and index == min(scr["blocks"])
        sources = list(cmr["sources"]) if cmr else []
        self.reweave = Reweave(d, int(cmr["rank"]), len(sources)) if cmr and self.point in cmr["targets"] else None
        self.readable = list(cmr["readable"][str(self.point)]) if self.reweave is not None else None
        self.capture = LayerCapture(d, int(cmr["rank"])) if cmr and self.point in sources else None
        self.capture_slot = sources.index(self.point) if self.capture is not None else None

    def _modulate(self, h, ctx: dict, placement: str, state):
        if self.scr is not None and self.scr_placement == placement:
            h, ctx["rho"] = self.scr(h, ctx["start"], None if self.scr_first else ctx["rho"], state)
        if self.lcm is not None and self.lcm_placement == placement:
            h = self.lcm(h, ctx["pos"], state)
        return h

    def forward(self, h, ctx: dict):
        state = ctx["cache"][self.point - 1] if ctx["cache"] is not None else None
        x = h + self.attention(self.attn_norm(h), ctx["cos"], ctx["sin"], state, ctx["mask"], ctx["causal"])
        x = self._modulate(x, ctx, "post_attn", state)
        x = x + self.mlp(self.mlp_norm(x))
        x = self._modulate(x, ctx, "post_mlp", state)
        return residual_point(self, x, ctx)


def residual_point(owner, h, ctx: dict):
    """CMR at state h^point: reweave from the bank, then capture into it. A stage-local target whose
    saved pipeline stage captured no source reads nothing and is skipped (the identity)."""
    if getattr(owner, "reweave", None) is not None and owner.readable:
        h = owner.reweave(h, ctx["bank_tensor"](), owner.readable)
    if getattr(owner, "capture", None) is not None:
        ctx["bank"][owner.capture_slot] = owner.capture(h)
    return h


# ----------------------------------------------------------------------------- the model
class LoomPreTrainedModel(PreTrainedModel):
    config_class = LoomConfig
    base_model_prefix = "loom"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # every weight comes from the checkpoint; keep torch's defaults for anything else
        return


class LoomForCausalLM(LoomPreTrainedModel, GenerationMixin):
    def __init__(self, config: LoomConfig):
        super().__init__(config)
        d = config.hidden_size
        cmr = (config.techniques or {}).get("cmr")
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.n_slots = len(cmr["sources"]) if cmr else 0
        self.bank_rank = int(cmr["rank"]) if cmr else 0
        if cmr and 0 in cmr["sources"]:
            self.capture = LayerCapture(d, int(cmr["rank"]))
            self.capture_slot = list(cmr["sources"]).index(0)
        else:
            self.capture = None
        self.point = 0
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(d, config.rms_norm_eps)
        self.output_layer = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def get_output_embeddings(self):
        return self.output_layer

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """`attention_mask` [b, past + n] (0 = left padding), `position_ids` [b, n] (default: each row's
        real tokens counted from 0), `past_key_values` a transformers Cache (one is made when `use_cache`)."""
        if input_ids is None:
            raise ValueError("LoomForCausalLM needs input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        layers = loom_layers(past_key_values, len(self.layers)) if use_cache else None
        n = input_ids.shape[1]
        if layers is not None and layers[0].get_seq_length() > 0 and n > 1:
            # after the prompt, LCM and SCR continue one token at a time
            steps = [
                self._logits(
                    input_ids[:, i : i + 1],
                    None if attention_mask is None else attention_mask[:, attention_mask.shape[1] - n + i :][:, :1],
                    None if position_ids is None else position_ids[:, i : i + 1],
                    layers,
                    0,
                )
                for i in range(n)
            ]
            logits = torch.cat(steps, dim=1)[:, -logits_to_keep:] if logits_to_keep else torch.cat(steps, dim=1)
        else:
            real = None if attention_mask is None else attention_mask[:, -n:]
            logits = self._logits(input_ids, real, position_ids, layers, logits_to_keep)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    def _logits(self, input_ids, real, position_ids, layers, logits_to_keep: int):
        """Logits [b, n or logits_to_keep, V] of new ids [b, n] (real [b, n]: not padding), appended to the
        cache `layers` (None: a whole sequence on its own)."""
        tokens = input_ids.t()  # [s, b]
        if layers is not None and layers[0].documents is None:
            layers[0].documents = Documents(tokens.shape[1], tokens.device)
        docs = layers[0].documents if layers is not None else Documents(tokens.shape[1], tokens.device)
        offset = layers[0].get_seq_length() if layers is not None else 0
        real = None if real is None or bool(real.bool().all()) else real.bool().t()
        pos, start, positions, real, all_real = docs.advance(tokens, real, self.config.document_eos_id)
        mask, causal = docs.mask(real, all_real, offset)
        if position_ids is not None:
            positions = position_ids.t()
        h = self.embedding(tokens)
        cos, sin = rope_at(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        bank: list = [None] * self.n_slots
        template = torch.zeros(tokens.shape[0], tokens.shape[1], max(self.bank_rank, 1), dtype=h.dtype, device=h.device)

        def bank_tensor():
            return torch.stack([template if t is None else t for t in bank], dim=2)

        ctx = {
            "pos": pos,
            "start": start,
            "cos": cos,
            "sin": sin,
            "rho": None,
            "bank": bank,
            "bank_tensor": bank_tensor,
            "cache": layers,
            "mask": mask,
            "causal": causal,
        }
        h = residual_point(self, h, ctx)
        resets = set(((self.config.techniques or {}).get("cmr") or {}).get("reset_bank_at") or [])
        for index, block in enumerate(self.layers):
            if index in resets:  # a new pipeline stage of the saved layout: stage-local CMR starts empty
                bank[:] = [None] * len(bank)
            h = block(h, ctx)
        h = self.final_norm(h[-logits_to_keep:] if logits_to_keep else h)
        weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        return F.linear(h, weight).transpose(0, 1).contiguous()  # [b, s, V]
