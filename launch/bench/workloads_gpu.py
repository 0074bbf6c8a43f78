"""What the `gpu` section measures, one configuration per fresh process (`runner_gpu`): Loom's
training step (its trainer path: `parallelize` → DeepSpeed engine, bf16 with fp32 masters, ZeRO-0,
`TrainModule.train_batch`) with any set of techniques, Hugging Face `LlamaForCausalLM` (sdpa, fp32
weights under bf16 autocast, fused AdamW: the HF Trainer's bf16 mode) and a bf16 matmul probe."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    micro_batch: int
    microbatches: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.microbatches * self.seq

    def describe(self) -> str:
        return (
            f"{self.layers} layers, d={self.hidden}, {self.heads} heads ({self.kv_heads} key/value: GQA), "
            f"SwiGLU {self.ffn}, vocab {self.vocab}, seq {self.seq}, {self.micro_batch} × {self.microbatches} "
            f"sequences per step ({self.tokens_per_step:,} tokens)"
        )


GPU_SHAPES = {
    # Llama-shaped ~1B (0.86 B parameters untied, TinyLlama's widths): fits one H200 without
    # activation checkpointing at 8 sequences of 4096 tokens
    "1b": GpuShape("1b", layers=16, hidden=2048, heads=16, kv_heads=4, ffn=5632, vocab=32000, seq=4096, micro_batch=8),
    "dry": GpuShape("dry", layers=2, hidden=64, heads=4, kv_heads=2, ffn=176, vocab=512, seq=64, micro_batch=2),
}
H200_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's H200 SXM dense (no sparsity) bf16 Tensor Core peak."""


def model_config(shape: GpuShape):
    """Loom's config at a GPU shape: no activation checkpointing (the 1B shape fits without)."""
    from loom.launch.bench.shapes import model_config as config_of

    return config_of(shape, activation_checkpointing=False)


def flops_per_token(shape: GpuShape) -> float:
    from loom.launch.train.tensorboard import flops_per_token as f

    return f(model_config(shape), shape.seq)


def bf16_attention_backward_works() -> bool:
    """Whether this CPU trains in bf16: torch's CPU flash-attention backward in bf16 needs AVX-512
    ("pack_vnni2 is only supported when avx512 is supported"; its kernel runs from 64 positions on)."""
    import torch

    q = torch.randn(1, 2, 128, 16, dtype=torch.bfloat16, requires_grad=True)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError:
        return False
    return True


def technique_config(names: tuple[str, ...], dry: bool):
    """Spec defaults for the named techniques, SCA's L_field live from step 0 (so its full cost is
    timed); the dry shape gets small ranks so every path still runs."""
    from loom.techniques.config import TechniquesConfig

    tech = TechniquesConfig()
    for name in names:
        getattr(tech, name).enabled = True
    tech.sca.warmup_steps = 0
    if dry:
        tech.lcm.K, tech.scr.rank, tech.cmr.rank, tech.sca.rank, tech.sca.window = 4, 8, 8, 8, 16
        tech.hcma.K1, tech.hcma.K2, tech.hcma.proj_dim, tech.hcma.knn = 4, 16, 16, 4
    return tech


def _tokens(shape: GpuShape, device):
    import torch

    g = torch.Generator().manual_seed(1000)
    t = torch.randint(4, shape.vocab, (shape.micro_batch * shape.microbatches, shape.seq + 1), generator=g)
    t[:, shape.seq // 3] = 3  # an EOS: Loom's document metadata sees packed documents
    return t.to(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device, warmup: int, steps: int) -> dict:
    """Warm-up steps, then `steps` steps each between two device synchronisations; peak memory over
    the warm-up and the timed steps."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"times": times, "peak_bytes": peak, "loss": float(loss)}


def loom_step(
    device_type: str, shape: GpuShape, techniques: tuple, warmup: int, steps: int, precision: str = "bf16"
) -> dict:
    """Loom's trainer path on one rank (the process group exists already: NCCL on CUDA)."""
    import torch

    from loom.launch.train.train_module import TrainModule
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.groups import init_parallel_groups
    from loom.model.parallel.optim import OptimConfig
    from loom.model.parallel.parallelize import parallelize
    from loom.model.parallel.zero_state import local_shape

    cpu_compat.apply()
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    layout = init_parallel_groups(ParallelConfig())
    optim = OptimConfig()
    sharded = parallelize(
        model_config(shape),
        technique_config(techniques, shape.name == "dry"),
        layout,
        ParallelConfig(microbatches=shape.microbatches),
        optim=optim,
        micro_batch_size=shape.micro_batch,
        seed=0,
        precision=precision,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    module = TrainModule(sharded, layout, shape.micro_batch, shape.seq, dtype, device)
    batches = list(_tokens(shape, device).split(shape.micro_batch))
    index = [0]

    def step():
        out = module.train_batch(batches, index[0], optim.lr)
        index[0] += 1
        return out["train/loss"]

    out = _timed(step, device, warmup, steps)
    out["params"] = sum(math.prod(local_shape(p)) for p in sharded.module.parameters())
    return out


def hf_step(device_type: str, shape: GpuShape, warmup: int, steps: int, precision: str = "bf16") -> dict:
    """`LlamaForCausalLM` (sdpa) at the same shape: fp32 weights, bf16 autocast, fused AdamW (Loom's
    parameter groups), gradient clipping at 1.0 — the loop of the HF Trainer with bf16=True."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from loom.launch.bench.shapes import hf_llama_config
    from loom.launch.bench.workloads import adamw

    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    config = hf_llama_config(shape)
    with torch.device(device):  # initialise on the device: a CPU init of 1B weights takes longer than the timing
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params)
    micro = list(_tokens(shape, device).split(shape.micro_batch))

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for tokens in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return total

    out = _timed(step, device, warmup, steps)
    out["params"] = sum(p.numel() for p in params)
    out["fused_adamw"] = bool(opt.defaults.get("fused"))
    return out


def matmul_probe(device_type: str, seconds: float = 1.0) -> dict:
    """Dense matmul throughput in this process: bf16 8192² on CUDA, fp32 512² on CPU (dry run)."""
    import torch

    from loom.launch.bench.hardware import matmul_flops

    if device_type == "cuda":
        flops = matmul_flops(8192, seconds, dtype=torch.bfloat16, device=torch.device("cuda", 0))
        return {"flops": flops, "what": "bf16 matmul 8192²"}
    return {"flops": matmul_flops(512, seconds, device=torch.device("cpu")), "what": "fp32 matmul 512² (CPU)"}
