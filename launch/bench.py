"""`loom bench`: Loom against its peers and against this machine's own limits, measured side by side.

Every number comes from one run on one machine. The machine may be shared and noisy, so:

* each configuration lives in its own forked worker process group (its own thread count, its own
  gloo world, its own memory) and waits on a pipe while the others run;
* configurations are measured in alternating rounds (A, B, C, then B, C, A, …) and the hardware
  probe (dense matmul FLOP/s, tensor-copy bandwidth) runs in every round too;
* step times are medians over all measured steps; ratios are medians of the per-round ratios, so a
  slow spell that hits one round hits both sides of its ratio;
* around every measurement the coordinator reads how much CPU the rest of the machine used
  (/proc/stat minus our workers' own time): rounds where nobody else ran are reported separately,
  and `--quiet-wait` makes rounds wait (and redo disturbed measurements) for such moments;
* the technique table carries an A/A control (two identical baseline processes) whose ratio is the
  noise floor of that run.

On two cores a two-threaded process that shares the machine with anything else slows down far
more than its share (every OpenMP barrier waits for a descheduled thread), so disturbed rounds are
several times slower, not a few percent. Absolute numbers mean something only next to the hardware
numbers of the same run; ratios are the result. Nothing here asserts a timing:
`tests/test_bench_smoke.py` only checks that the harness runs and prints its tables.

Sections (all in `run_bench`): hardware ceiling, peers (Loom vs Hugging Face `LlamaForCausalLM`
with SDPA vs megatron-core `GPTModel` with the local spec), technique overhead (time and memory),
parallel layouts (1 process vs DP2/TP2/PP2), ZeRO 0-3 per-rank bytes against theory, data path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EOS = 3


# ----------------------------------------------------------------------------------------- shapes
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
        return (f"{self.layers} layers, d={self.hidden}, {self.heads} heads, SwiGLU {self.ffn}, vocab {self.vocab}, "
                f"seq {self.seq}, batch {self.batch} ({self.tokens_per_step} tokens/step)")


SHAPES = {
    "quick": Shape("quick", layers=2, hidden=128, heads=4, ffn=352, vocab=1024, seq=64, batch=4),
    "default": Shape("default", layers=4, hidden=512, heads=8, ffn=1408, vocab=8192, seq=256, batch=8),
    "large": Shape("large", layers=8, hidden=1024, heads=16, ffn=2816, vocab=32000, seq=512, batch=8),
}


def model_config(shape: Shape):
    from model.config import ModelConfig

    return ModelConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                       num_heads=shape.heads, num_kv_heads=shape.heads, ffn_hidden_size=shape.ffn,
                       seq_length=shape.seq, tie_embeddings=False, eos_id=EOS)


def flops_per_token(shape: Shape) -> float:
    from launch.metrics import flops_per_token as f

    return f(model_config(shape), shape.seq)


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def token_batch(shape: Shape, batch: int, seed: int = 0):
    """[batch, seq+1] ids with a few EOS, so Loom's document metadata sees packed documents."""
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    t = torch.randint(4, shape.vocab, (batch, shape.seq + 1), generator=g)
    t[:, shape.seq // 3] = EOS
    return t.to(_device())


# ------------------------------------------------------------------------------ hardware probes
def matmul_flops(n: int = 2048, seconds: float = 0.4, dtype=None, device=None) -> float:
    """Dense n×n matmul FLOP/s on this process's threads (fp32 on CPU, bf16 on GPU)."""
    import torch

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = a @ b
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=c)
        iters += 1
        if iters >= 3:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2.0 * n**3 * iters / (time.perf_counter() - start)


def copy_bandwidth(mbytes: int = 256, seconds: float = 0.4, device=None) -> float:
    """Bytes/s moved by `dst.copy_(src)` of a large fp32 tensor (read + write counted)."""
    import torch

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    n = mbytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        dst.copy_(src)
        iters += 1
        if iters >= 3:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2.0 * n * 4 * iters / (time.perf_counter() - start)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe:
    """The hardware ceiling, measured in its own worker with the benchmark's thread count."""

    def __init__(self, rank: int, world: int, quick: bool = False):
        self.seconds = 0.15 if quick else 0.4
        self.n = 1024 if quick else 2048
        self.mbytes = 64 if quick else 256

    def measure(self) -> dict:
        import torch

        return {"flops": matmul_flops(self.n, self.seconds), "bandwidth": copy_bandwidth(self.mbytes, self.seconds),
                "matmul": f"{'bf16' if torch.cuda.is_available() else 'fp32'} matmul ({self.n}²)",
                "copy": f"tensor copy ({self.mbytes} MiB, read + write)"}


# ----------------------------------------------------------------------------------- workloads
def init_grid(tp: int = 1, pp: int = 1):
    """megatron-core's grid on the worker's default process group (Loom and megatron need it)."""
    from model.parallel import cpu_compat
    from model.parallel.config import ParallelConfig
    from model.parallel.groups import init_parallel_groups

    cpu_compat.apply()
    return init_parallel_groups(ParallelConfig(tensor=tp, pipeline=pp))


def _adamw(params, lr: float = 3e-4):
    """The optimizer every model gets: Loom's AdamW groups (no decay on vectors), fused when possible."""
    import torch

    from model.parallel.zero import OptimizerSettings, build_optimizer

    class _Holder(torch.nn.Module):
        def __init__(self, ps):
            super().__init__()
            self.ps = torch.nn.ParameterList(ps)

    return build_optimizer(_Holder(list(params)), OptimizerSettings(lr=lr))


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    import torch

    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


class SavedTensorMeter:
    """Bytes of the activations autograd saves for backward during one step (distinct storages,
    parameters excluded): with one micro-batch this is what is alive at the end of the forward."""

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen: dict[int, int] = {}

    def _pack(self, t):
        import torch

        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self.exclude:
                self.seen[ptr] = max(self.seen.get(ptr, 0), s.nbytes())
        return t

    def context(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


class Workload:
    """A training job in one worker: `step()` runs one optimizer step of the global batch."""

    tokens_per_step: int = 0

    def step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def measure(self, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            out.append(time.perf_counter() - start)
        return out

    def rss_high_water_kb(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PlainLoop(Workload):
    """The loop all three peers share: zero_grad → forward → backward → clip 1.0 → AdamW."""

    def __init__(self, model, loss_fn: Callable, batch):
        import torch

        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _adamw(self.params)
        self.tokens_per_step = batch.shape[0] * (batch.shape[1] - 1)
        self.model.train()
        self.torch = torch

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.last_loss = float(loss)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.params)


def build_loom_plain(rank, world, shape: Shape, seed: int = 0, tech=None) -> PlainLoop:
    """Loom's GPTStage in the peers' loop (no DeepSpeed); with `tech`, HCMA's hierarchy is built
    once first so its regulariser is live, as after the trainer's step-0 upkeep."""
    from model.parallel.parallelize import build_stage
    from techniques.aux_loss import set_aux_loss_scale
    from techniques.config import TechniquesConfig

    layout = init_grid()
    module = build_stage(model_config(shape), tech or TechniquesConfig(), layout, seed)
    if module.hcma is not None:
        module.hcma.refresh(module.embedding.weight.detach(), 0, shape.vocab)
    set_aux_loss_scale(1.0)
    return PlainLoop(module, lambda m, t: m(t), token_batch(shape, shape.batch))


def build_hf_llama(rank, world, shape: Shape, seed: int = 0) -> PlainLoop:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=shape.seq, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(_device())
    assert model.config._attn_implementation == "sdpa"

    def loss_fn(m, tokens):
        logits = m(input_ids=tokens[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    return PlainLoop(model, loss_fn, token_batch(shape, shape.batch))


def build_megatron_gpt(rank, world, shape: Shape, seed: int = 0) -> PlainLoop:
    """megatron-core's own GPTModel: local (non-TE) spec, RMSNorm, SwiGLU, RoPE, no biases, fusions
    off (on CPU they route through torch.compile), explicit causal mask, fp32."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.core import tensor_parallel

    init_grid()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the (CPU) RNG tracker its attention forks
    cfg = TransformerConfig(num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                            ffn_hidden_size=shape.ffn, kv_channels=shape.head_dim, gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
                            layernorm_epsilon=1e-5, use_cpu_initialization=True, perform_initialization=True,
                            gradient_accumulation_fusion=False, bias_activation_fusion=False,
                            bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
                            persist_layer_norm=False, attention_dropout=0.0, hidden_dropout=0.0,
                            params_dtype=torch.float32)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=shape.vocab, max_sequence_length=shape.seq, position_embedding_type="rope",
                     rotary_base=10000, share_embeddings_and_output_weights=False).to(_device())
    s = shape.seq
    position_ids = torch.arange(s, device=_device()).unsqueeze(0).expand(shape.batch, s).contiguous()
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=_device()), diagonal=1)
    mask = mask.view(1, 1, s, s)  # True = masked

    def loss_fn(m, tokens):
        return m(tokens[:, :-1].contiguous(), position_ids, mask, labels=tokens[:, 1:].contiguous()).float().mean()

    return PlainLoop(model, loss_fn, token_batch(shape, shape.batch))


class LoomTrainer(Workload):
    """Loom's own training path: `parallelize` (DeepSpeed engine, ZeRO stage, own 1F1B schedule)
    and `ShardedStage.train_step`, with the techniques' upkeep before each step as the trainer does."""

    def __init__(self, rank, world, shape: Shape, tech=None, tp: int = 1, pp: int = 1, zero: int = 0,
                 microbatches: int = 1, seed: int = 0):
        import torch

        from model.parallel.config import ParallelConfig
        from model.parallel.parallelize import parallelize
        from model.parallel.zero import OptimizerSettings
        from techniques.config import TechniquesConfig

        self.layout = layout = init_grid(tp, pp)
        if zero == 3:  # zero.Init reads the DP size through deepspeed.comm, which nothing has started yet
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
        self.shape, self.tech = shape, tech or TechniquesConfig()
        per_rank = shape.batch // layout.dp
        if per_rank * layout.dp != shape.batch or per_rank % microbatches:
            raise ValueError(f"batch {shape.batch} does not split into DP {layout.dp} x {microbatches} micro-batches")
        self.micro = per_rank // microbatches
        parallel = ParallelConfig(tensor=tp, pipeline=pp, zero_stage=zero, microbatches=microbatches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.sharded = parallelize(model_config(shape), self.tech, layout, parallel, OptimizerSettings(),
                                       self.micro, seed, precision="fp32")
        self.specs = self.sharded.module.carry_specs(self.micro, shape.seq, torch.float32)
        full = token_batch(shape, shape.batch)
        mine = full[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
        self.batches = list(mine.split(self.micro))
        self.tokens_per_step = shape.tokens_per_step  # global: every DP rank's share together
        self.step_index = 0

    def param_count(self) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.sharded.module.parameters())

    def step(self) -> None:
        from launch.technique_upkeep import upkeep

        upkeep(self.sharded, self.layout, self.step_index)
        self.last = self.sharded.train_step(self.batches, self.step_index, self.specs)
        self.step_index += 1

    # ------------------------------------------------------------------ memory accounting
    def state_bytes(self) -> dict:
        """Bytes this rank holds between steps: parameters (its ZeRO-3 partition), gradients,
        optimizer state (moments and DeepSpeed's fp32 master partitions), buffers and technique state."""
        import torch

        engine, module = self.sharded.engine, self.sharded.module
        params = list(module.parameters())
        held = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
        out = {"params": tensor_bytes(held),
               "params_full": 4 * sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in params),
               "buffers": tensor_bytes(module.buffers())}
        out["grads"] = tensor_bytes([p.grad for p in params] + _zero_grad_buffers(engine.optimizer))
        out["buckets"] = tensor_bytes(_zero_buckets(engine.optimizer))
        out["optimizer"] = tensor_bytes(_optimizer_tensors(engine.optimizer))
        hcma = getattr(module, "hcma", None)
        out["technique_state"] = tensor_bytes(getattr(hcma, "_state", {}).values()) if hcma is not None else 0
        return out

    def memory_report(self) -> dict:
        """One more step under a saved-tensor meter (activations), then the rank's state bytes."""
        import torch

        engine, module = self.sharded.engine, self.sharded.module
        meter = SavedTensorMeter(exclude=list(module.parameters()))
        grads = {}

        def before_optimizer_step(*_):  # gradients exist only between backward and the step
            grads["bytes"] = tensor_bytes([p.grad for p in module.parameters()] + _zero_grad_buffers(engine.optimizer))

        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        handle = inner.register_step_pre_hook(before_optimizer_step)
        try:
            with meter.context():
                self.step()
        finally:
            handle.remove()
        out = self.state_bytes()
        out["grads"] = max(out["grads"], grads.get("bytes", 0))
        out["activations"] = meter.bytes
        out["rss_high_water_kb"] = self.rss_high_water_kb()
        if torch.cuda.is_available():
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        return out

    def hcma_refresh_seconds(self, repeats: int = 2) -> float:
        from launch.technique_upkeep import _refresh_hcma

        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _refresh_hcma(self.sharded, self.layout)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def zero_bytes(self) -> dict:
        """Per-rank bytes under ZeRO: state after a step, and gradients held between two
        micro-batches of one step (where ZeRO-2/3 keep only their partition)."""
        engine = self.sharded.engine
        first = self.batches[0]
        engine.backward(engine(first, None, step=self.step_index))
        between = tensor_bytes([p.grad for p in engine.module.parameters()] + _zero_grad_buffers(engine.optimizer))
        buckets = tensor_bytes(_zero_buckets(engine.optimizer))
        engine.step()
        for mb in self.batches[1:]:
            engine.backward(engine(mb, None, step=self.step_index))
            engine.step()
        self.step_index += 1
        out = self.state_bytes()
        out["grads_between_microbatches"] = between
        out["buckets"] = max(buckets, out["buckets"])
        return out


def _optimizer_tensors(optimizer) -> list:
    """Moments of the inner torch optimizer and DeepSpeed's fp32 master partitions (a separate copy
    even in fp32 runs)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    out = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        out += [t for t in getattr(optimizer, name, None) or [] if torch.is_tensor(t)]
    return out


def _zero_grad_buffers(optimizer) -> list:
    """Gradient storage inside DeepSpeed's ZeRO optimizers (gradient partitions; buckets separately)."""
    import torch

    out = []
    for name in ("averaged_gradients", "grads_in_partition", "all_grad_tensors"):
        value = getattr(optimizer, name, None)
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for v in value:
                items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
                out += [t for t in items if torch.is_tensor(t)]
        elif torch.is_tensor(value):
            out.append(value)
    for name in ("_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",):
        value = getattr(optimizer, name, None)
        if isinstance(value, dict):
            out += [t for t in value.values() if torch.is_tensor(t)]
    return out


def _zero_buckets(optimizer) -> list:
    """DeepSpeed's reduce buckets (`reduce_bucket_size` elements per dtype)."""
    import torch

    out = []
    buckets = getattr(optimizer, "ipg_buckets", None)
    if isinstance(buckets, dict):
        for bucket in buckets.values():
            buffer = getattr(bucket, "buffer", None)
            if torch.is_tensor(buffer):  # ZeRO-3: one flat tensor (never iterate over it)
                out.append(buffer)
            elif isinstance(buffer, (list, tuple)):
                out += [t for t in buffer if torch.is_tensor(t)]
    return out


class DataPath(Workload):
    """Tokenizer encode and loader throughput on a real corpus (see tests/bench/bench_data.py)."""

    def __init__(self, rank, world, corpus: str = "linuxdoc", seq: int = 256, micro_batch: int = 8,
                 max_docs: int | None = None, vocab_size: int = 8192):
        from data.corpora import ensure_corpus, iter_documents
        from data.shards import preprocess
        from data.tokenizer import Tokenizer, train_tokenizer

        self.tmp = tempfile.TemporaryDirectory(prefix="loom-bench-data-")
        work = self.tmp.name
        source = ensure_corpus(corpus)
        if max_docs is not None:
            import json

            subset = os.path.join(work, f"{corpus}-subset.jsonl")
            with open(subset, "w", encoding="utf-8") as f:
                for i, text in enumerate(iter_documents(source)):
                    if i >= max_docs:
                        break
                    f.write(json.dumps({"text": text}) + "\n")
            source = subset
        self.corpus, self.seq, self.micro_batch = corpus, seq, micro_batch
        self.documents = list(iter_documents(source))
        self.megabytes = sum(len(d.encode()) for d in self.documents) / 1e6
        model = train_tokenizer(source, os.path.join(work, "tok", corpus), vocab_size=vocab_size, model_type="bpe")
        self.tokenizer = Tokenizer(model)
        self.shards = os.path.join(work, "shards")
        preprocess(source, model, self.shards, seq_length=seq, samples_per_shard=64, num_workers=1, progress=False)

    def encode(self, threads: int = 1) -> dict:
        start = time.perf_counter()
        ids = self.tokenizer.encode_batch(self.documents, num_threads=threads)
        seconds = time.perf_counter() - start
        tokens = sum(len(i) for i in ids)
        return {"tokens": tokens, "seconds": seconds, "megabytes": self.megabytes}

    def load(self, num_workers: int, batches: int) -> dict:
        from data.loader import build_train_loader

        loader = build_train_loader(self.shards, self.micro_batch, num_workers=num_workers, seed=0)
        start = time.perf_counter()
        tokens = 0
        try:
            for _ in range(batches):
                tokens += next(loader).numel()
        finally:
            seconds = time.perf_counter() - start
            loader.close()
        return {"tokens": tokens, "seconds": seconds}

    def close(self) -> None:
        self.tmp.cleanup()


# ------------------------------------------------------------------------- worker processes
class BenchError(RuntimeError):
    """A worker raised or died; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preimport() -> None:
    """Import the heavy modules once in the parent, so forked workers start in well under a second.
    The parent itself never computes with torch (a forked child cannot use OpenMP threads its
    parent already started)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        from megatron.core.models.gpt import GPTModel  # noqa: F401
        from model.parallel import cpu_compat

        cpu_compat.setup_deepspeed_env()
        import deepspeed  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401
        import model.gpt  # noqa: F401
        import model.parallel.parallelize  # noqa: F401


_PARENT_ENDS: list = []  # the coordinator's ends of every worker pipe (closed in each new worker)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the coordinator exits, however it exits."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(rank: int, world: int, port: int, threads: int, factory, kwargs: dict, conn) -> None:
    import faulthandler
    import logging

    _die_with_parent()
    for end in _PARENT_ENDS:  # inherited copies would keep other workers' pipes open forever
        try:
            end.close()
        except OSError:
            pass
    faulthandler.enable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        with contextlib.redirect_stdout(sys.stderr) if rank else contextlib.nullcontext():
            obj = factory(rank, world, **kwargs)
        conn.send(("ok", {"threads": torch.get_num_threads()}))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            name, call_kwargs = msg
            try:
                conn.send(("ok", getattr(obj, name)(**call_kwargs)))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    except BaseException as exc:  # noqa: BLE001
        try:
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except Exception:  # noqa: BLE001
            pass
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
        os._exit(0)


class WorkerGroup:
    """`world` forked processes with `threads` threads each, one gloo world, holding one workload
    built by `factory(rank, world, **kwargs)`; `call` runs one of its methods on every rank."""

    def __init__(self, name: str, factory, world: int = 1, threads: int = 1, timeout: float = 900.0, **kwargs):
        self.name, self.world, self.threads, self.timeout = name, world, threads, timeout
        ctx = mp.get_context("fork")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(rank, world, port, threads, factory, kwargs, child),
                            daemon=False, name=f"bench-{name}-{rank}")  # may start loader workers
            p.start()
            child.close()
            _PARENT_ENDS.append(parent)
            self.conns.append(parent)
            self.procs.append(p)
        self.info = self._gather()

    def _gather(self) -> list:
        results, deadline = [None] * self.world, time.monotonic() + self.timeout
        pending = set(range(self.world))
        while pending:
            for rank in list(pending):
                conn = self.conns[rank]
                if conn.poll(0.01):
                    try:
                        status, payload = conn.recv()
                    except EOFError:
                        status, payload = "error", f"rank {rank} exited without a result"
                    if status != "ok":
                        self.close()
                        raise BenchError(f"[{self.name}] {payload}")
                    results[rank] = payload
                    pending.discard(rank)
                elif not self.procs[rank].is_alive() and not conn.poll(0):
                    self.close()
                    raise BenchError(f"[{self.name}] rank {rank} died (exit code {self.procs[rank].exitcode})")
            if time.monotonic() > deadline:
                self.close()
                raise BenchError(f"[{self.name}] timed out after {self.timeout:.0f}s")
        return results

    def call(self, method: str, **kwargs) -> list:
        for conn in self.conns:
            conn.send((method, kwargs))
        return self._gather()

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                if p.is_alive():
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
            if conn in _PARENT_ENDS:
                _PARENT_ENDS.remove(conn)
        self.procs = []


@contextlib.contextmanager
def worker_groups(specs: dict):
    """Start every group of `specs` (name → (factory, world, threads, kwargs)); close them all after."""
    groups: dict[str, WorkerGroup] = {}
    try:
        for name, (factory, world, threads, kwargs) in specs.items():
            groups[name] = WorkerGroup(name, factory, world=world, threads=threads, **kwargs)
        yield groups
    finally:
        for group in groups.values():
            group.close()


# ------------------------------------------------------------------------------- alternation
QUIET_CORES = 0.25  # a measurement is "quiet" when the rest of the machine used less than this


@dataclass
class Series:
    """Step times of one configuration: per round, the step times of its slowest rank, and how
    many of the cores it uses the rest of the machine took meanwhile."""

    rounds: list[list[float]] = field(default_factory=list)
    external: list[float] = field(default_factory=list)

    @property
    def all(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def median(self) -> float:
        return statistics.median(self.all)

    @property
    def best(self) -> float:
        return min(self.all)

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]


def paired_ratio(a: Series, b: Series) -> float:
    """Median over rounds of (a's round median / b's round median)."""
    return statistics.median(x / y for x, y in zip(a.round_medians(), b.round_medians()))


def quiet_paired_ratio(a: Series, b: Series, minimum: int = 3) -> tuple[float | None, int]:
    """`paired_ratio` over the rounds in which neither side shared the machine (None if too few)."""
    pairs = [(x, y) for x, y, ea, eb in zip(a.round_medians(), b.round_medians(), a.external, b.external)
             if ea < QUIET_CORES and eb < QUIET_CORES]
    if len(pairs) < minimum:
        return None, len(pairs)
    return statistics.median(x / y for x, y in pairs), len(pairs)


class CpuMeter:
    """CPU time the rest of the machine used while our workers ran, in cores (Linux /proc; the
    machine-wide busy time minus our processes' own)."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.available = os.path.exists("/proc/stat")

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait

    @staticmethod
    def _ours(pids) -> int:
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                total += int(rest[11]) + int(rest[12])  # utime, stime (all threads)
            except (OSError, IndexError, ValueError):
                pass
        return total

    def start(self, pids) -> tuple:
        pids = list(pids) + [os.getpid()]
        return (pids, self._busy(), self._ours(pids), time.perf_counter()) if self.available else None

    def stop(self, token) -> float:
        if token is None:
            return float("nan")
        pids, busy, ours, t0 = token
        seconds = max(time.perf_counter() - t0, 1e-6)
        other = (self._busy() - busy) - (self._ours(pids) - ours)
        return max(0.0, other / self.hz / seconds)

    def wait_for_quiet(self, max_wait: float, log=None) -> float:
        """Sleep (in 1 s samples) until the rest of the machine is idle or `max_wait` has passed;
        returns the last sample's busy cores."""
        deadline, busy = time.monotonic() + max_wait, float("nan")
        while self.available:
            token = self.start([])
            time.sleep(1.0)
            busy = self.stop(token)
            if busy < QUIET_CORES or time.monotonic() >= deadline:
                break
        return busy


LOAD: list[float] = []  # cores the rest of the machine used, per measured configuration and round


@dataclass
class Hardware:
    flops: list[float] = field(default_factory=list)
    bandwidth: list[float] = field(default_factory=list)
    labels: tuple = ("matmul", "tensor copy (read + write)")

    @property
    def peak_flops(self) -> float:
        return statistics.median(self.flops)


def alternate(groups: dict[str, WorkerGroup], rounds: int, steps: int, warmup: int, probe: WorkerGroup | None,
              hardware: Hardware, log=print, quiet_wait: float = 0.0) -> dict[str, Series]:
    """Warm every group up, then `rounds` rounds; each round runs every group for `steps` steps in
    a rotated order, with a hardware probe first. With `quiet_wait` > 0 a round may spend up to
    that many seconds waiting for the rest of the machine to go idle, before it starts and before
    redoing a measurement that shared the machine."""
    meter = CpuMeter()
    names = list(groups)
    for name in names:
        if warmup:
            groups[name].call("measure", steps=warmup)
    out = {name: Series() for name in names}
    for r in range(rounds):
        deadline = time.monotonic() + quiet_wait
        if quiet_wait > 0:
            meter.wait_for_quiet(quiet_wait)
        if probe is not None:
            result = probe.call("measure")[0]
            hardware.flops.append(result["flops"])
            hardware.bandwidth.append(result["bandwidth"])
            hardware.labels = (result["matmul"], result["copy"])
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            # others running on cores this configuration leaves idle do not disturb it
            spare = max(0, meter.cpus - groups[name].world * groups[name].threads)
            while True:  # with quiet_wait, a measurement disturbed by others is redone until the deadline
                token = meter.start(p.pid for p in groups[name].procs)
                per_rank = groups[name].call("measure", steps=steps)
                external = max(0.0, meter.stop(token) - spare)
                if not external >= QUIET_CORES or time.monotonic() >= deadline:
                    break
                meter.wait_for_quiet(max(0.0, deadline - time.monotonic()))
            out[name].external.append(external)
            out[name].rounds.append([max(ts) for ts in zip(*per_rank)])
        LOAD.extend(out[n].external[-1] for n in names)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {statistics.median(out[n].rounds[-1]):.3f}s (others on its cores {out[n].external[-1]:.1f})"
            for n in names))
    return out


# ------------------------------------------------------------------------------------ options
@dataclass
class BenchOptions:
    shape: Shape = SHAPES["default"]
    rounds: int = 8
    steps: int = 1
    warmup: int = 2
    threads: int = 2
    sections: tuple = ("peers", "techniques", "layouts", "zero", "data")
    corpus: str = "linuxdoc"
    quick: bool = False
    data_docs: int | None = None
    loader_batches: int = 400
    quiet_wait: float = 0.0

    @classmethod
    def make(cls, quick: bool = False, large: bool = False, **overrides) -> "BenchOptions":
        if quick:
            base = cls(shape=SHAPES["quick"], rounds=2, steps=1, warmup=1, quick=True, corpus="shakespeare",
                       data_docs=8, loader_batches=50)
        else:
            base = cls(shape=SHAPES["large"] if large else SHAPES["default"])
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------- sections
def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.lines.append("| " + " | ".join(str(c) for c in row) + " |")
        self.lines.append("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    if ok:
        return f"met ({value:.2f} vs {target:.2f})"
    gap = value / target - 1 if lower_is_better else 1 - value / target
    return f"**missed** by {abs(gap) * 100:.0f}% ({value:.2f} vs {target:.2f})"


def section_peers(opts: BenchOptions, report: Report, log) -> None:
    shape, t = opts.shape, opts.threads
    fpt = flops_per_token(shape)
    specs = {
        "loom": (LoomTrainer, 1, t, {"shape": shape}),
        "loom-plain": (build_loom_plain, 1, t, {"shape": shape}),
        "hf": (build_hf_llama, 1, t, {"shape": shape}),
        "megatron": (build_megatron_gpt, 1, t, {"shape": shape}),
        "probe": (Probe, 1, t, {"quick": opts.quick}),
    }
    log(f"peers: {shape.describe()}, 1 process × {t} threads")
    hw = Hardware()
    with worker_groups(specs) as groups:
        probe, groups = groups["probe"], {k: g for k, g in groups.items() if k != "probe"}
        counts = {name: g.call("param_count")[0] for name, g in groups.items()}
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, probe, hw, log, opts.quiet_wait)
    report.results["hardware_peers"] = hw
    report.results["series_peers"] = series
    labels = {"loom": "Loom (trainer path: `parallelize` → DeepSpeed engine, ZeRO-0)",
              "loom-plain": "Loom (GPTStage module in the peers' loop)",
              "hf": "HF `LlamaForCausalLM` (sdpa)",
              "megatron": "megatron-core `GPTModel` (local spec)"}
    rows = []
    for name, s in series.items():
        tps = shape.tokens_per_step / s.median
        rows.append([labels[name], f"{counts[name] / 1e6:.2f} M", _fmt_time(s.median), _fmt_time(s.best),
                     _fmt_rate(tps),
                     f"{tps * fpt / hw.peak_flops * 100:.1f}%", f"{paired_ratio(series['loom'], s):.3f}",
                     f"{series['loom'].best / s.best:.3f}"])
    report.add(f"### Peers: one training step, 1 process × {t} threads", "",
               f"Shape: {shape.describe()}. Loop: zero_grad → forward → loss → backward → clip 1.0 → "
               f"AdamW (fused) with Loom's parameter groups; fp32. MFU = tokens/s × {fpt / 1e6:.1f} MFLOP/token "
               f"(`launch.metrics.flops_per_token`) / median probed matmul peak "
               f"({hw.peak_flops / 1e9:.0f} GFLOP/s). Ratios: Loom's (trainer path) step time over this row's, "
               "as the median of per-round ratios and as best step over best step.", "")
    report.table(["model", "parameters", "step time (median)", "best step", "tokens/s", "MFU",
                  "Loom ÷ this (paired median)",
                  "Loom ÷ this (best ÷ best)"], rows)
    loom_hf, loom_mg = paired_ratio(series["loom"], series["hf"]), paired_ratio(series["loom"], series["megatron"])
    report.results["peers"] = {"loom/hf": loom_hf, "loom/megatron": loom_mg,
                               "best": {n: s.best for n, s in series.items()},
                               "loom-plain/hf": paired_ratio(series["loom-plain"], series["hf"]),
                               "loom/loom-plain": paired_ratio(series["loom"], series["loom-plain"]),
                               "step": {n: s.median for n, s in series.items()}}


def _technique_configs(shape: Shape) -> dict:
    """Each technique alone with the spec's defaults, and all five together. SCA's L_field warm-up
    is set to 0 so its full cost is measured; HCMA's refresh runs at step 0 (before timing)."""
    from techniques.config import TechniquesConfig

    def make(*names):
        tech = TechniquesConfig()
        for name in names:
            getattr(tech, name).enabled = True
        tech.sca.warmup_steps = 0
        if shape.name == "quick":  # sized for the tiny shape so every path runs
            tech.lcm.K, tech.scr.rank, tech.cmr.rank, tech.sca.rank, tech.sca.window = 4, 8, 8, 8, 16
            tech.hcma.K1, tech.hcma.K2, tech.hcma.proj_dim, tech.hcma.knn = 4, 16, 16, 4
        return tech

    configs = {"baseline": make(), "baseline (A/A control)": make()}
    for name in ("lcm", "scr", "cmr", "sca", "hcma"):
        configs[name] = make(name)
    configs["all five"] = make("lcm", "scr", "cmr", "sca", "hcma")
    return configs


def section_techniques(opts: BenchOptions, report: Report, log) -> None:
    shape, t = opts.shape, opts.threads
    configs = _technique_configs(shape)
    specs = {name: (LoomTrainer, 1, t, {"shape": shape, "tech": tech}) for name, tech in configs.items()}
    log(f"techniques: {len(configs)} configurations, 1 process × {t} threads")
    with worker_groups(specs) as groups:
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, None, Hardware(), log, opts.quiet_wait)
        memory = {name: g.call("memory_report")[0] for name, g in groups.items()}
        refresh = {name: g.call("hcma_refresh_seconds")[0] for name, g in groups.items()
                   if configs[name].hcma.enabled}
    base = series["baseline"]
    report.results["series_techniques"] = series

    def tensor_total(m):
        return m["params"] + m["grads"] + m["optimizer"] + m["buffers"] + m["technique_state"] + m["activations"]

    rows, ratios = [], {}
    for name, s in series.items():
        m = memory[name]
        time_ratio = paired_ratio(s, base)
        mem_ratio = tensor_total(m) / tensor_total(memory["baseline"])
        act_ratio = m["activations"] / memory["baseline"]["activations"]
        rss_growth = (m["rss_high_water_kb"] - memory["baseline"]["rss_high_water_kb"]) / 1024
        target = 1.10 if name == "all five" else 1.03
        ratios[name] = {"time": time_ratio, "memory": mem_ratio, "best": s.best / base.best}
        rows.append([name, _fmt_time(s.median), f"{time_ratio:.3f}", f"{s.best / base.best:.3f}",
                     "–" if name.startswith("baseline") else _verdict(time_ratio, target),
                     _fmt_bytes(tensor_total(m)), f"{mem_ratio:.3f}", f"{act_ratio:.3f}",
                     f"{m['rss_high_water_kb'] / 1024:.0f} MiB ({rss_growth:+.0f})"])
    report.add(f"### Technique overhead (Loom trainer path, 1 process × {t} threads, same shape)", "",
               "Spec defaults (`techniques/config.py`), except SCA's `warmup_steps=0` so L_field is live. "
               "Memory = tensor bytes at the step's peak: parameters + gradients (taken just before the "
               "optimizer step) + AdamW state + buffers + "
               "technique state + activations saved for backward (distinct storages, counted with "
               "`torch.autograd.graph.saved_tensors_hooks`). RSS high-water is `ru_maxrss` of the config's own "
               "worker process (± vs baseline; allocator caching makes it coarse). The A/A control is a second, "
               "identical baseline process: its ratio is the noise floor of this table.", "")
    report.table(["config", "step time", "time / baseline (paired median)", "best ÷ best", "target",
                  "tensor bytes at peak", "memory / baseline",
                  "activations / baseline", "RSS high-water"], rows)
    for name, seconds in refresh.items():
        every = configs[name].hcma.refresh_every
        report.add(f"HCMA refresh ({name}): {_fmt_time(seconds)} every {every} steps = "
                   f"{seconds / every / base.median * 100:.2f}% of a baseline step, amortised (not in the step times).")
    report.add("")
    report.results["techniques"] = ratios


def section_layouts(opts: BenchOptions, report: Report, log) -> None:
    shape, t = opts.shape, opts.threads
    pp_micro = 4 if shape.batch % 4 == 0 else 2
    specs = {
        f"1 process × {t} threads": (LoomTrainer, 1, t, {"shape": shape}),
        "1 process × 1 thread": (LoomTrainer, 1, 1, {"shape": shape}),
        "DP2 (ZeRO-0)": (LoomTrainer, 2, 1, {"shape": shape}),
        "DP2 (ZeRO-1)": (LoomTrainer, 2, 1, {"shape": shape, "zero": 1}),
        "TP2": (LoomTrainer, 2, 1, {"shape": shape, "tp": 2}),
        f"PP2 ({pp_micro} micro-batches)": (LoomTrainer, 2, 1, {"shape": shape, "pp": 2, "microbatches": pp_micro}),
        "probe": (Probe, 1, t, {"quick": opts.quick}),
    }
    log(f"layouts: global batch {shape.batch}")
    hw = Hardware()
    fpt = flops_per_token(shape)
    with worker_groups(specs) as groups:
        probe, groups = groups["probe"], {k: g for k, g in groups.items() if k != "probe"}
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, probe, hw, log, opts.quiet_wait)
        state = {name: g.call("state_bytes") for name, g in groups.items()}
    names = list(series)
    one_t, one_1 = series[names[0]], series[names[1]]
    rows = []
    for name, s in series.items():
        tps = shape.tokens_per_step / s.median
        per_rank = max(m["params"] + m["optimizer"] for m in state[name])
        rows.append([name, _fmt_time(s.median), _fmt_time(s.best), _fmt_rate(tps),
                     f"{tps * fpt / hw.peak_flops * 100:.1f}%", f"{paired_ratio(one_t, s):.2f}×",
                     f"{paired_ratio(one_1, s):.2f}×", _fmt_bytes(per_rank)])
    report.add(f"### Parallel layouts on this machine (global batch {shape.batch} × {shape.seq})", "",
               "Ranks of multi-process layouts run 1 thread each (2 ranks on 2 cores). "
               "Speed-up = paired median of (reference step time / this step time), i.e. the tokens/s ratio. "
               "Per-rank bytes = parameters + optimizer state (moments and DeepSpeed's fp32 master copy) "
               "held by the largest rank after a step.", "")
    report.table(["layout", "step time", "best step", "tokens/s", "MFU", f"speed-up vs 1p×{t}t", "speed-up vs 1p×1t",
                  "params + optimizer / rank"], rows)
    report.results["layouts"] = {name: {"vs_1p_threads": paired_ratio(one_t, s), "vs_1p_1t": paired_ratio(one_1, s),
                                        "best_vs_1p_threads": one_t.best / s.best, "best_vs_1p_1t": one_1.best / s.best,
                                        "tokens_per_s": shape.tokens_per_step / s.median}
                                 for name, s in series.items()}
    report.results["hardware_layouts"] = hw
    report.results["series_layouts"] = series


def section_zero(opts: BenchOptions, report: Report, log) -> None:
    shape = opts.shape
    log("zero: DP2, stages 0-3, per-rank bytes")
    rows = []
    results = {}
    for zero in (0, 1, 2, 3):
        with worker_groups({f"zero{zero}": (LoomTrainer, 2, 1, {"shape": shape, "zero": zero,
                                                                 "microbatches": 2})}) as groups:
            group = groups[f"zero{zero}"]
            group.call("measure", steps=1)
            m = max(group.call("zero_bytes"), key=lambda d: d["params"] + d["optimizer"])
            seconds = statistics.median(max(ts) for ts in zip(*group.call("measure", steps=max(2, opts.steps))))
        full = m["params_full"]  # fp32 bytes of the whole model = 4Ψ
        n = 2
        theory = {  # fp32 DeepSpeed: ZeRO-1/2/3 keep an fp32 master partition next to Adam's two moments
            0: (full, full, 2 * full),
            1: (full, full, 3 * full / n),
            2: (full, full / n, 3 * full / n),
            3: (full / n, full / n, 3 * full / n),
        }[zero]
        measured = (m["params"], m["grads_between_microbatches"], m["optimizer"])
        results[zero] = {"measured": measured, "theory": theory, "buckets": m["buckets"]}
        rows.append([f"ZeRO-{zero}"] + [f"{_fmt_bytes(a)} ({a / b:.2f}×)" for a, b in zip(measured, theory)]
                    + [_fmt_bytes(sum(measured)), _fmt_bytes(sum(theory)), _fmt_bytes(m["buckets"]),
                       _fmt_time(seconds)])
    report.add("### ZeRO stages: per-rank bytes on DP=2 against theory", "",
               f"Ψ = {full / 4 / 1e6:.2f} M parameters (fp32, 4Ψ = {_fmt_bytes(full)}). Theory per rank for fp32 "
               "DeepSpeed with N=2: ZeRO-0 params 4Ψ, grads 4Ψ, optimizer 8Ψ (torch AdamW moments); ZeRO-1 "
               "optimizer 12Ψ/N (fp32 master partition + moments); ZeRO-2 also grads 4Ψ/N; ZeRO-3 also params 4Ψ/N. "
               "Gradients are measured between the two micro-batches of a step (ZeRO-1 holds full gradients "
               "there, ZeRO-2/3 only their partition); each cell shows measured (measured / theory). "
               "Reduce buckets are DeepSpeed's communication buffers (`parallel.reduce_bucket_size` elements, "
               "not in the theory; the largest seen during or after the step). "
               "Step time: 2 micro-batches, not alternated (indicative only).", "")
    report.table(["stage", "params", "grads", "optimizer state", "measured total", "theory total",
                  "reduce buckets", "step time"], rows)
    report.results["zero"] = results


def section_data(opts: BenchOptions, report: Report, log) -> None:
    shape = opts.shape
    log(f"data: corpus {opts.corpus}")
    consumed = report.results.get("training_tokens_per_s")
    with worker_groups({"data": (DataPath, 1, 1, {"corpus": opts.corpus, "seq": shape.seq,
                                                  "micro_batch": shape.batch, "max_docs": opts.data_docs,
                                                  "vocab_size": 1024 if opts.quick else 8192})}) as groups:
        g = groups["data"]
        enc1 = g.call("encode", threads=1)[0]
        enc2 = g.call("encode", threads=2)[0]
        loads = {w: g.call("load", num_workers=w, batches=opts.loader_batches)[0] for w in (0, 1)}
    rows = []

    def ratio(tps):
        return f"{tps / consumed:,.0f}×" if consumed else "–"

    for label, e in (("SentencePiece encode, 1 thread", enc1), ("SentencePiece encode, 2 threads", enc2)):
        tps = e["tokens"] / e["seconds"]
        rows.append([label, f"{e['tokens'] / 1e6:.2f} M tokens ({e['megabytes']:.1f} MB)", _fmt_time(e["seconds"]),
                     f"{tps / 1e6:.2f} M", ratio(tps)])
    for w, r in loads.items():
        tps = r["tokens"] / r["seconds"]
        rows.append([f"loader, num_workers={w}, [{shape.batch}, {shape.seq + 1}] batches",
                     f"{r['tokens'] / 1e6:.2f} M tokens", _fmt_time(r["seconds"]), f"{tps / 1e6:.2f} M", ratio(tps)])
    report.add(f"### Data path vs training consumption (corpus `{opts.corpus}`)", "",
               f"Training consumes {_fmt_rate(consumed) if consumed else '?'} tokens/s (fastest Loom layout of "
               "this run). Loader throughput includes the first batch (worker start-up).", "")
    report.table(["stage", "work", "time", "tokens/s", "× training"], rows)
    loader_best = max(r["tokens"] / r["seconds"] for r in loads.values())
    report.results["data"] = {"loader_tokens_per_s": loader_best,
                              "encode_tokens_per_s": enc1["tokens"] / enc1["seconds"],
                              "loader_vs_training": loader_best / consumed if consumed else None}


# -------------------------------------------------------------------------------------- driver
def _hardware_table(report: Report, opts: BenchOptions) -> None:
    hws = [h for k in ("hardware_peers", "hardware_layouts") if (h := report.results.get(k))]
    flops = [f for h in hws for f in h.flops]
    bw = [b for h in hws for b in h.bandwidth]
    if not flops:
        return
    report.add(f"### Hardware ceiling (measured in this run, {opts.threads} threads, every round)", "")
    labels = hws[0].labels
    report.table(["probe", "median", "min", "max", "samples"], [
        [labels[0], f"{statistics.median(flops) / 1e9:.0f} GFLOP/s", f"{min(flops) / 1e9:.0f}",
         f"{max(flops) / 1e9:.0f}", len(flops)],
        [labels[1], f"{statistics.median(bw) / 1e9:.1f} GB/s", f"{min(bw) / 1e9:.1f}",
         f"{max(bw) / 1e9:.1f}", len(bw)]])


def _targets(report: Report) -> None:
    """The issue's targets, judged on the paired median of all rounds; beside it best ÷ best and the
    paired median of the quiet rounds only (the rest of the machine idle on both sides)."""
    r = report.results
    rows = []

    def row(text, median, best, quiet, target, lower=True):
        q, n = quiet if quiet is not None else (None, 0)
        basis = q if q is not None else median  # quiet rounds when there are enough of them
        verdict = _verdict(basis, target, lower_is_better=lower) + (" (quiet rounds)" if q is not None else "")
        estimates = [v for v in (median, best, q) if v is not None]
        if len(estimates) > 1 and min(estimates) <= target <= max(estimates):
            verdict += "; uncertain: the estimates straddle the target"
        rows.append([text, f"{median:.3f}", "–" if best is None else f"{best:.3f}",
                     f"{q:.3f} ({n})" if q is not None else f"– ({n})", verdict])

    if "peers" in r:
        p, sp = r["peers"], r["series_peers"]
        row("Loom step ≤ 0.90× HF Llama (sdpa)", p["loom/hf"], p["best"]["loom"] / p["best"]["hf"],
            quiet_paired_ratio(sp["loom"], sp["hf"]), 0.90)
        row("Loom step ≤ 0.90× megatron-core GPTModel", p["loom/megatron"],
            p["best"]["loom"] / p["best"]["megatron"], quiet_paired_ratio(sp["loom"], sp["megatron"]), 0.90)
    if "techniques" in r:
        st = r["series_techniques"]
        for name, v in r["techniques"].items():
            quiet = quiet_paired_ratio(st[name], st["baseline"])
            if name.startswith("baseline ("):
                q, n = quiet
                rows.append([f"(noise floor: {name}, ideally 1.00)", f"{v['time']:.3f}", f"{v['best']:.3f}",
                             f"{q:.3f} ({n})" if q is not None else f"– ({n})", "–"])
            elif name != "baseline":
                limit = 1.10 if name == "all five" else 1.03
                row(f"{name}: step ≤ {limit:.2f}× baseline", v["time"], v["best"], quiet, limit)
    if "layouts" in r:
        dp, sl = r["layouts"].get("DP2 (ZeRO-0)"), r["series_layouts"]
        if dp:
            names = list(sl)
            row("DP=2 tokens/s ≥ 1.8× one process (1 thread each)", dp["vs_1p_1t"], dp["best_vs_1p_1t"],
                quiet_paired_ratio(sl[names[1]], sl["DP2 (ZeRO-0)"]), 1.8, lower=False)
            row("DP=2 tokens/s ≥ 1.8× one process (2 threads: the whole machine)", dp["vs_1p_threads"],
                dp["best_vs_1p_threads"], quiet_paired_ratio(sl[names[0]], sl["DP2 (ZeRO-0)"]), 1.8, lower=False)
    if "data" in r and r["data"]["loader_vs_training"]:
        row("loader ≥ 20× training consumption", r["data"]["loader_vs_training"], None, None, 20.0, lower=False)
    if rows:
        report.add("### Targets", "",
                   f"'Quiet rounds' is the paired median over the rounds in which the rest of the machine took "
                   f"< {QUIET_CORES} of the cores in use during both measurements (/proc/stat minus the workers' "
                   "own CPU time, less the cores a configuration leaves idle; their number in brackets; "
                   "– when fewer than 3). "
                   "Verdicts use it when it exists, else the paired median over all rounds; a verdict is marked "
                   "uncertain when the estimates (all rounds, best ÷ best, quiet rounds) fall on both sides of "
                   "the target.", "")
        report.table(["target", "paired median, all rounds", "best ÷ best", "paired median, quiet rounds",
                      "verdict"], rows)


SECTIONS = {"peers": section_peers, "techniques": section_techniques, "layouts": section_layouts,
            "zero": section_zero, "data": section_data}


def run_bench(opts: BenchOptions, log=None) -> Report:
    """Run the selected sections and return the report (markdown in `report.text()`)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    preimport()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    LOAD.clear()
    body = Report()
    body.results["options"] = opts
    for name in opts.sections:
        t0 = time.perf_counter()
        SECTIONS[name](opts, body, log)
        log(f"{name}: {time.perf_counter() - t0:.0f}s")
        if name in ("peers", "layouts"):
            _record_training_rate(body, opts)
    report = Report(results=body.results)
    import torch

    report.add(f"## `loom bench` — {opts.shape.name} shape", "",
               f"{platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), torch {torch.__version__}, "
               f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}; load average at start "
               f"{load_at_start:.1f}; {_load_summary()}; "
               f"{opts.rounds} alternating rounds × {opts.steps} step(s) after "
               f"{opts.warmup} warm-up step(s); {datetime.datetime.now():%Y-%m-%d %H:%M}.", "")
    _hardware_table(report, opts)
    _targets(report)
    report.lines += body.lines
    report.add(f"Total benchmark time {time.perf_counter() - started:.0f} s; load average at end "
               f"{os.getloadavg()[0]:.1f}.")
    return report


def _load_summary() -> str:
    """How much the rest of the machine ran while configurations were measured."""
    values = [v for v in LOAD if not math.isnan(v)]
    if not values:
        return "others' CPU use not measured"
    quiet = sum(v < QUIET_CORES for v in values)
    return (f"during measurements the rest of the machine took {statistics.median(values):.2f} of the cores a "
            f"configuration used (median; max {max(values):.2f}), {quiet} of {len(values)} measurements quiet "
            f"(< {QUIET_CORES} cores)")


def _record_training_rate(report: Report, opts: BenchOptions) -> None:
    best = report.results.get("training_tokens_per_s", 0.0)
    if "peers" in report.results:
        best = max(best, opts.shape.tokens_per_step / report.results["peers"]["step"]["loom"])
    for layout in report.results.get("layouts", {}).values():
        best = max(best, layout["tokens_per_s"])
    report.results["training_tokens_per_s"] = best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
