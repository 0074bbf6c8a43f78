"""The network's shape. Parallel layout lives in `model.parallel.config`, techniques in `techniques.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Tokenizer vocabulary size; the embedding is padded beyond it for tensor parallelism."""
    hidden_size: int = 256
    """Width d of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks L."""
    num_heads: int = 4
    """Attention query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null means as many as query heads."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner width; null means 8/3·d rounded up to a multiple of 64 (Llama's rule)."""
    seq_length: int = 256
    """Tokens per training sample (the model also accepts shorter inputs)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    pad_vocab_to_multiple_of: int = 128
    """The padded vocabulary is a multiple of this value times the tensor-parallel size."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init; output projections get std/sqrt(2L)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    eos_id: int = 3
    """Token id that ends a document; document positions restart after it."""
    init_from: Optional[str] = None
    """Consolidated weights to start from at any layout (`loom convert consolidate`, `from-hf` or `reshard`);
    ignored when resuming."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.pad_vocab_to_multiple_of * tp
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, tp: int = 1, pp: int = 1, virtual_stages: int = 1) -> list[str]:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "seq_length", "pad_vocab_to_multiple_of"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads is not None and self.num_kv_heads <= 0:
            problems.append(f"model.num_kv_heads must be positive, got {self.num_kv_heads}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            problems.append(f"model.ffn_hidden_size must be positive, got {self.ffn_hidden_size}")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            problems.append("model.init_std, model.norm_eps and model.rope_theta must be positive")
        if problems:
            return problems
        if self.hidden_size % self.num_heads:
            problems.append(
                f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}"
            )
        elif self.head_dim % 2:
            problems.append(f"head dimension {self.head_dim} must be even for RoPE")
        if self.num_heads % self.kv_heads:
            problems.append(f"model.num_heads {self.num_heads} is not divisible by model.num_kv_heads {self.kv_heads}")
        if tp > 0:
            if self.num_heads % tp:
                problems.append(f"model.num_heads {self.num_heads} is not divisible by parallel.tensor {tp}")
            if self.kv_heads % tp:
                problems.append(f"key/value heads {self.kv_heads} are not divisible by parallel.tensor {tp}")
            if self.ffn_size % tp:
                problems.append(f"FFN width {self.ffn_size} is not divisible by parallel.tensor {tp}")
        if pp > 0 and self.num_layers % pp:
            problems.append(f"model.num_layers {self.num_layers} is not divisible by parallel.pipeline {pp}")
        elif pp > 0 and virtual_stages > 1 and self.num_layers % (pp * virtual_stages):
            problems.append(
                f"model.num_layers {self.num_layers} is not divisible by parallel.pipeline × parallel.virtual_stages "
                f"= {pp} × {virtual_stages}"
            )
        return problems
