"""Model shapes the benchmark compares at, and the token batches every model trains on."""

from __future__ import annotations

from dataclasses import dataclass

EOS = 3


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        return (
            f"{self.layers} layers, d={self.hidden}, {self.heads} heads, SwiGLU {self.ffn}, vocab {self.vocab}, "
            f"seq {self.seq}, batch {self.batch} ({self.tokens_per_step} tokens/step)"
        )


SHAPES = {
    "quick": Shape("quick", layers=2, hidden=128, heads=4, ffn=352, vocab=1024, seq=64, batch=4),
    "default": Shape("default", layers=4, hidden=512, heads=8, ffn=1408, vocab=8192, seq=256, batch=8),
    "large": Shape("large", layers=8, hidden=1024, heads=16, ffn=2816, vocab=32000, seq=512, batch=8),
}


def model_config(shape, **overrides):
    """Loom's ModelConfig for a benchmark shape (a `Shape`, or the GPU section's `GpuShape` with its own
    KV heads); `overrides` replace fields."""
    from loom.model.config import ModelConfig

    fields = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_layers=shape.layers,
        num_heads=shape.heads,
        num_kv_heads=getattr(shape, "kv_heads", shape.heads),
        ffn_hidden_size=shape.ffn,
        seq_length=shape.seq,
        tie_embeddings=False,
        eos_id=EOS,
    )
    return ModelConfig(**{**fields, **overrides})


def hf_llama_config(shape):
    """transformers' LlamaConfig of the same network as `model_config(shape)` (the peers' baseline)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=getattr(shape, "kv_heads", shape.heads),
        max_position_embeddings=shape.seq,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def flops_per_token(shape: Shape) -> float:
    from loom.launch.train.tensorboard import flops_per_token as f

    return f(model_config(shape), shape.seq)


def token_batch(shape: Shape, batch: int, seed: int = 0):
    """[batch, seq+1] ids with a few EOS, so Loom's document metadata sees packed documents."""
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    t = torch.randint(4, shape.vocab, (batch, shape.seq + 1), generator=g)
    t[:, shape.seq // 3] = EOS
    from loom.model.parallel.parallelize import default_device

    return t.to(default_device())
