"""A Loom model for Hugging Face `transformers` (remote code), written by `loom convert to-hf --remote-code`.

Self-contained plain PyTorch: the same network as Loom's training code at TP=1, PP=1 — a Llama-style
pre-norm decoder (fp32 RMSNorm, split-half RoPE, grouped-query attention with a fused per-group QKV
weight, SwiGLU with an interleaved fused gate/up weight) plus the techniques that change the forward
pass: LCM (Latent Convergence Modulation), SCR (Structured Context Recomposition) and CMR
(Contextual Memory Reweaving). SCA is training-only and HCMA lives in the embedding table, so
neither needs code here. Weight names equal Loom's own (`layers.3.lcm.alpha`, …).

Limitations: no KV cache (`generate` re-runs the prefix each step: pass `use_cache=False`, the
default here); no padding inside a batch (an `attention_mask` with zeros is refused), because LCM
and SCR read packed-document positions from the token ids.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_loom import LoomConfig


# ----------------------------------------------------------------------------- packed documents
def document_metadata(tokens: torch.Tensor, eos_id: Optional[int]):
    """pos, start, doc of [s, b] ids: a document starts at 0 and right after every EOS."""
    s = tokens.shape[0]
    start = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    start[0] = True
    if eos_id is not None and s > 1:
        start[1:] = tokens[:-1] == eos_id
    steps = torch.arange(s, device=tokens.device)[:, None].expand_as(start)
    current = torch.where(start, steps, torch.zeros_like(steps)).cummax(0).values
    return steps - current, start, start.long().cumsum(0)


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


def rope_tables(seq_len: int, head_dim: int, theta: float, device, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
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

    def forward(self, x, cos, sin):
        s, b, _ = x.shape
        qkv = self.qkv(x).view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(s, b, -1, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_per_group > 1)
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


# ----------------------------------------------------------------------------- LCM
def lag_taps(K: int, beta: float, device=None):
    taps = beta ** torch.arange(K, dtype=torch.float32, device=device)
    return taps / taps.sum()


def causal_anchor(h, pos, taps, block: int = 64):
    """c_t = tap-weighted mean of the previous K positions of the same document (h_t at a start)."""
    s, b, d = h.shape
    K = taps.numel()
    if s == 0:
        return h.clone()
    steps = torch.arange(s, device=h.device)[:, None]
    n_lags = torch.minimum(pos.to(steps.dtype), steps).clamp(0, K)
    tap_mass = F.pad(taps.cumsum(0), (1, 0))[n_lags]
    C = min(block, s)
    n_blocks = -(-s // C)
    pad = n_blocks * C - s
    lag = torch.arange(C, device=h.device)[:, None] + K - torch.arange(C + K, device=h.device)[None, :]
    band = torch.where((lag >= 1) & (lag <= K), taps[(lag - 1).clamp(0, K - 1)], torch.zeros((), device=h.device))

    def per_block(x):
        return F.pad(x, (0, 0, 0, pad)).view(n_blocks, C, b).transpose(1, 2)[..., None]

    n_lags_b, mass_b = per_block(n_lags), per_block(tap_mass)
    weights = torch.where(lag <= n_lags_b, band / mass_b.clamp_min(1e-12), torch.zeros((), device=h.device))
    weights = weights + ((lag == 0) & (n_lags_b == 0)).to(weights.dtype)
    windows = F.pad(h, (0, 0, 0, 0, K, pad)).unfold(0, C + K, C)
    anchor = torch.matmul(weights.to(h.dtype), windows.transpose(-1, -2))
    return anchor.transpose(1, 2).reshape(n_blocks * C, b, d)[:s]


class LCM(nn.Module):
    def __init__(self, hidden_size: int, c: dict):
        super().__init__()
        self.K, self.beta, self.a_max = int(c["K"]), float(c["beta"]), float(c["a_max"])
        self.n_iter, self.clamp, self.use_gate = int(c["n_iter"]), bool(c["clamp"]), bool(c["gate"])
        self.alpha = nn.Parameter(torch.zeros(hidden_size))
        if self.use_gate:
            self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
            self.gate_weight = nn.Parameter(torch.zeros(hidden_size))
            self.gate_bias = nn.Parameter(torch.zeros(1))

    def forward(self, h, pos):
        hf = h.float()
        anchor = causal_anchor(hf, pos, lag_taps(self.K, self.beta, h.device))
        a = self.a_max * torch.tanh(self.alpha.float())
        if self.clamp:
            a = a.clamp(min=0.0)
        if self.use_gate:
            u = F.rms_norm(hf, self.norm.normalized_shape, self.norm.weight.float(), self.norm.eps).to(h.dtype)
            step = torch.sigmoid(u.float() @ self.gate_weight.float() + self.gate_bias.float())[..., None] * a
        else:
            step = a
        if self.n_iter > 1:
            step = 1.0 - (1.0 - step) ** self.n_iter
        return (hf - step * (hf - anchor)).to(h.dtype)


# ----------------------------------------------------------------------------- SCR
def _scan_blocks(x, local_doc, decay: float):
    C = x.shape[1]
    idx = torch.arange(C, device=x.device)
    dist = idx[:, None] - idx[None, :]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    kernel = torch.where(dist >= 0, decay ** dist.clamp(min=0).to(x.dtype), zero)
    docs = local_doc.transpose(1, 2)
    mixing = kernel * (docs[..., :, None] == docs[..., None, :])
    return torch.matmul(mixing, x.transpose(1, 2)).transpose(1, 2)


def segmented_cumsum(x, start, decay: float = 1.0, block: int = 64):
    """y_t = sum over k <= t in the same document of decay^(t-k) x_k, along dim 0 of [s, b, k]."""
    s, b, k = x.shape
    if s == 0:
        return x.clone()
    C = min(max(block, 2), s)
    n_blocks = -(-s // C)
    pad = n_blocks * C - s
    xb = F.pad(x, (0, 0, 0, 0, 0, pad)).view(n_blocks, C, b, k)
    starts = torch.cat([start, start.new_zeros(pad, b)]) if pad else start
    local_doc = starts.view(n_blocks, C, b).long().cumsum(1)
    y = _scan_blocks(xb, local_doc, decay)
    if n_blocks > 1:
        ends = segmented_cumsum(y[:, -1], local_doc[:, -1] > 0, decay**C, block)
        carry = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
        reach = decay ** torch.arange(1, C + 1, device=x.device, dtype=x.dtype)
        open_doc = (local_doc == 0).to(x.dtype) * reach[:, None]
        y = y + open_doc[..., None] * carry[:, None]
    return y.reshape(n_blocks * C, b, k)[:s]


class SCR(nn.Module):
    def __init__(self, hidden_size: int, c: dict):
        super().__init__()
        self.gamma, self.decay = float(c["gamma"]), float(c["decay"])
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.relevance = nn.Linear(hidden_size, 1)
        self.down = nn.Linear(hidden_size, int(c["rank"]), bias=False)
        self.up = nn.Linear(int(c["rank"]), hidden_size, bias=False)

    def forward(self, h, start, rho_prev=None):
        u = F.rms_norm(h.float(), self.norm.normalized_shape, self.norm.weight.float(), self.norm.eps).to(h.dtype)
        relevance = torch.sigmoid(
            F.linear(u.float(), self.relevance.weight.float(), self.relevance.bias.float()).squeeze(-1)
        )
        if rho_prev is None or self.gamma == 0:
            rho = relevance
        else:
            rho = self.gamma * rho_prev.float() + (1.0 - self.gamma) * relevance
        v = self.down(u).float()
        sums = segmented_cumsum(torch.cat([rho[..., None] * v, rho[..., None]], dim=-1), start, self.decay)
        summary = sums[..., :-1] / (sums[..., -1:] + 1e-6)
        return h + self.up(summary.to(h.dtype)), rho


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

    def _modulate(self, h, ctx: dict, placement: str):
        if self.scr is not None and self.scr_placement == placement:
            h, ctx["rho"] = self.scr(h, ctx["start"], None if self.scr_first else ctx["rho"])
        if self.lcm is not None and self.lcm_placement == placement:
            h = self.lcm(h, ctx["pos"])
        return h

    def forward(self, h, ctx: dict):
        x = h + self.attention(self.attn_norm(h), ctx["cos"], ctx["sin"])
        x = self._modulate(x, ctx, "post_attn")
        x = x + self.mlp(self.mlp_norm(x))
        x = self._modulate(x, ctx, "post_mlp")
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
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        past_key_values=None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        if input_ids is None:
            raise ValueError("LoomForCausalLM needs input_ids")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "LoomForCausalLM does not support padding (attention_mask with zeros): LCM and "
                "SCR read document positions from the ids; run sequences one at a time"
            )
        tokens = input_ids.t()  # [s, b]
        pos, start, _ = document_metadata(tokens, self.config.document_eos_id)
        h = self.embedding(tokens)
        cos, sin = rope_tables(tokens.shape[0], self.config.head_dim, self.config.rope_theta, h.device, h.dtype)
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
        }
        h = residual_point(self, h, ctx)
        resets = set(((self.config.techniques or {}).get("cmr") or {}).get("reset_bank_at") or [])
        for index, block in enumerate(self.layers):
            if index in resets:  # a new pipeline stage of the saved layout: stage-local CMR starts empty
                bank[:] = [None] * len(bank)
            h = block(h, ctx)
        h = self.final_norm(h)
        weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        logits = F.linear(h, weight).transpose(0, 1).contiguous()  # [b, s, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # no KV cache: every step sees the whole prefix
        return {"input_ids": input_ids, "attention_mask": attention_mask}
