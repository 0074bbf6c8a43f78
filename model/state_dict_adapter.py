"""What the names of the model's full (TP=1) state dict mean, and their Hugging Face Llama names.

`LLAMA_NAMES` is the one table between Loom and `LlamaForCausalLM` (torchtitan keeps the same kind of
table beside its model): one-to-one renames, plus the two fused weights Loom keeps for tensor
parallelism, split into Llama's separate projections and fused back exactly:

* `attention.qkv.weight` rows are grouped per key/value head g — [q heads of g, k_g, v_g] — so a TP
  split hands every rank whole groups; Llama keeps q_proj (all q heads in order), k_proj, v_proj.
  RoPE is the split-half layout in both, so no row permutation is needed.
* `mlp.gate_up.weight` rows interleave gate_0, up_0, gate_1, …; Llama keeps gate_proj and up_proj.

Technique parameters have no Llama name: an export with LCM, SCR or CMR active needs Loom's own
modeling code (`loom convert to-hf --remote-code`).
"""

from __future__ import annotations

import re

import torch

from loom.model.config import ModelConfig

LLAMA_NAMES: dict[str, str] = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attention.proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
"""Loom name → Llama name for weights that map one to one ({i}: block index)."""

LLAMA_FUSED: dict[str, tuple[str, ...]] = {
    "layers.{i}.attention.qkv.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "layers.{i}.mlp.gate_up.weight": (
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
    ),
}
"""Loom's fused weights → the Llama weights they hold (split by `_split`, fused by `_fuse`)."""

_TECHNIQUE_PART = re.compile(r"(^|\.)(lcm|scr|reweave|capture|sca)\.")
_TRAINING_ONLY = re.compile(r"(^|\.)sca\.|\.reweave\.rec_maps$")


def is_technique_name(name: str) -> bool:
    """LCM, SCR, CMR (reweave/capture) and SCA parameters and buffers."""
    return bool(_TECHNIQUE_PART.search(name))


def is_training_only(name: str) -> bool:
    """SCA's heads and field buffers and CMR's reconstruction maps: they shape training (auxiliary
    losses) but never the forward pass, so exports drop them."""
    return bool(_TRAINING_ONLY.search(name))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (TP=1, unpadded vocabulary) shapes of the core weights of a model config."""
    d, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, d), "final_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output_layer.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attention.qkv.weight"] = ((cfg.num_heads + 2 * cfg.kv_heads) * hd, d)
        shapes[p + "attention.proj.weight"] = (d, cfg.num_heads * hd)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.gate_up.weight"] = (2 * cfg.ffn_size, d)
        shapes[p + "mlp.down.weight"] = (d, cfg.ffn_size)
    return shapes


def _names(cfg: ModelConfig) -> list[tuple[str, str | tuple[str, ...]]]:
    """Every (Loom name, Llama name or names) pair of a model config, blocks expanded."""
    pairs: list[tuple[str, str | tuple[str, ...]]] = []
    for table in (LLAMA_NAMES, LLAMA_FUSED):
        for loom, llama in table.items():
            if loom == "output_layer.weight" and cfg.tie_embeddings:
                continue
            if "{i}" not in loom:
                pairs.append((loom, llama))
                continue
            for i in range(cfg.num_layers):
                other = llama.format(i=i) if isinstance(llama, str) else tuple(n.format(i=i) for n in llama)
                pairs.append((loom.format(i=i), other))
    return pairs


def _split(loom_name: str, value: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    d, hd, kv = cfg.hidden_size, cfg.head_dim, cfg.kv_heads
    if loom_name.endswith("qkv.weight"):
        qpg = cfg.num_heads // kv
        qkv = value.view(kv, qpg + 2, hd, d)
        return (
            qkv[:, :qpg].reshape(cfg.num_heads * hd, d),
            qkv[:, qpg].reshape(kv * hd, d),
            qkv[:, qpg + 1].reshape(kv * hd, d),
        )
    gate_up = value.view(cfg.ffn_size, 2, d)
    return gate_up[:, 0], gate_up[:, 1]


def _fuse(loom_name: str, parts: tuple[torch.Tensor, ...], cfg: ModelConfig) -> torch.Tensor:
    d, hd, kv = cfg.hidden_size, cfg.head_dim, cfg.kv_heads
    if loom_name.endswith("qkv.weight"):
        q, k, v = parts
        q = q.reshape(kv, cfg.num_heads // kv, hd, d)
        return torch.cat([q, k.reshape(kv, 1, hd, d), v.reshape(kv, 1, hd, d)], dim=1).reshape(-1, d)
    gate, up = parts
    return torch.stack([gate, up], dim=1).reshape(2 * cfg.ffn_size, d)


def to_llama(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom TP=1 weights → `LlamaForCausalLM` state dict (vocabulary rows cut to vocab_size).
    Technique tensors are left behind: the caller checks that they are absent or the identity."""
    out: dict[str, torch.Tensor] = {}
    for loom, llama in _names(cfg):
        value = weights[loom]
        if loom in ("embedding.weight", "output_layer.weight"):
            value = value[: cfg.vocab_size]
        if isinstance(llama, str):
            out[llama] = value
        else:
            out.update(zip(llama, _split(loom, value, cfg)))
    return {k: v.contiguous() for k, v in out.items()}


def from_llama(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` state dict → Loom TP=1 weights (fp32). Raises KeyError naming a missing weight."""

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"the Hugging Face weights have no {name}")
        return hf[name].float()

    out: dict[str, torch.Tensor] = {}
    for loom, llama in _names(cfg):
        out[loom] = get(llama) if isinstance(llama, str) else _fuse(loom, tuple(get(n) for n in llama), cfg)
    return {k: v.contiguous() for k, v in out.items()}
