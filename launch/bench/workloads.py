"""What a benchmark worker runs: the peers' shared training loop (Loom, HF Llama, megatron-core
GPTModel) and the data path. Loom's own trainer path is `launch.benchmark.trainer`."""

from __future__ import annotations

import abc
import os
import resource
import tempfile
import time
from typing import Callable

from loom.launch.bench.shapes import Shape, hf_llama_config, model_config, token_batch
from loom.model.parallel.parallelize import default_device


def init_grid(tp: int = 1, pp: int = 1):
    """megatron-core's grid on the worker's default process group (Loom and megatron need it)."""
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.groups import init_parallel_groups

    cpu_compat.apply()
    return init_parallel_groups(ParallelConfig(tensor=tp, pipeline=pp))


def adamw(params, lr: float = 3e-4):
    """The optimizer every model gets: Loom's AdamW groups (no decay on vectors), fused when possible."""
    import torch

    from loom.model.parallel.optim import OptimConfig, build_optimizer

    class _Holder(torch.nn.Module):
        def __init__(self, ps):
            super().__init__()
            self.ps = torch.nn.ParameterList(ps)

    return build_optimizer(_Holder(list(params)), OptimConfig(lr=lr))


class Workload(abc.ABC):
    """A training job in one worker, timed step by step."""

    tokens_per_step: int = 0

    @abc.abstractmethod
    def step(self) -> None:
        """One optimizer step of the global batch."""

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
    """The loop all three peers share: zero_grad → forward → backward → clip 1.0 → AdamW. With
    `world > 1` the model is wrapped in torch's DistributedDataParallel (bucketed gradient
    all-reduce overlapped with backward) and each rank takes its share of the global batch."""

    def __init__(self, model, loss_fn: Callable, batch, rank: int = 0, world: int = 1):
        import torch

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.tokens_per_step = batch.shape[0] * (batch.shape[1] - 1)  # global: every rank's share
        if world > 1:
            per_rank = batch.shape[0] // world
            model = torch.nn.parallel.DistributedDataParallel(model)
            batch = batch[rank * per_rank : (rank + 1) * per_rank]
        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.opt = adamw(self.params)
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
    from loom.model.parallel.parallelize import build_stage
    from loom.techniques.aux_loss import set_aux_loss_scale
    from loom.techniques.config import TechniquesConfig

    layout = init_grid()
    module = build_stage(model_config(shape), tech or TechniquesConfig(), layout, seed)
    if module.hcma is not None:
        module.hcma.refresh(module.embedding.weight.detach(), 0, shape.vocab)
    set_aux_loss_scale(1.0)
    return PlainLoop(module, lambda m, t: m(t), token_batch(shape, shape.batch))


def build_hf_llama(rank, world, shape: Shape, seed: int = 0) -> PlainLoop:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = hf_llama_config(shape)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(default_device())
    assert model.config._attn_implementation == "sdpa"

    def loss_fn(m, tokens):
        logits = m(input_ids=tokens[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    return PlainLoop(model, loss_fn, token_batch(shape, shape.batch), rank, world)


def build_megatron_gpt(rank, world, shape: Shape, seed: int = 0) -> PlainLoop:
    """megatron-core's own GPTModel: local (non-TE) spec, RMSNorm, SwiGLU, RoPE, no biases, fusions
    off (on CPU they route through torch.compile), explicit causal mask, fp32."""
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_grid()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the (CPU) RNG tracker its attention forks
    cfg = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        ffn_hidden_size=shape.ffn,
        kv_channels=shape.head_dim,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=torch.float32,
    )
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=shape.vocab,
        max_sequence_length=shape.seq,
        position_embedding_type="rope",
        rotary_base=10000,
        share_embeddings_and_output_weights=False,
    ).to(default_device())
    s = shape.seq
    position_ids = torch.arange(s, device=default_device()).unsqueeze(0).expand(shape.batch, s).contiguous()
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=default_device()), diagonal=1)
    mask = mask.view(1, 1, s, s)  # True = masked

    def loss_fn(m, tokens):
        return (
            m(tokens[:, :-1].contiguous(), position_ids[: tokens.shape[0]], mask, labels=tokens[:, 1:].contiguous())
            .float()
            .mean()
        )

    return PlainLoop(model, loss_fn, token_batch(shape, shape.batch), rank, world)


class DataPath:
    """Tokenizer encode and loader throughput on a real corpus (see tests/bench/bench_data.py).
    Not a `Workload`: it has no training step, the data section calls `encode` and `load`."""

    def __init__(
        self,
        rank,
        world,
        corpus: str = "linuxdoc",
        seq: int = 256,
        micro_batch: int = 8,
        max_docs: int | None = None,
        vocab_size: int = 8192,
    ):
        from loom.data.corpora import ensure_corpus, iter_documents
        from loom.data.shards import preprocess
        from loom.data.tokenizer import Tokenizer, train_tokenizer

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
        self.work = work
        self.documents = list(iter_documents(source))
        self.megabytes = sum(len(d.encode()) for d in self.documents) / 1e6
        model = train_tokenizer(source, os.path.join(work, "tok", corpus), vocab_size=vocab_size, model_type="bpe")
        self.tokenizer = Tokenizer(model)
        self.tokenizer_model = model
        self.shards = os.path.join(work, "shards")
        preprocess(source, model, self.shards, seq_length=seq, samples_per_shard=64, num_workers=1, progress=False)

    def encode(self, threads: int = 1) -> dict:
        start = time.perf_counter()
        ids = self.tokenizer.encode_batch(self.documents, num_threads=threads)
        seconds = time.perf_counter() - start
        tokens = sum(len(i) for i in ids)
        return {"tokens": tokens, "seconds": seconds, "megabytes": self.megabytes}

    def load(self, num_workers: int, batches: int) -> dict:
        from loom.data.loader import build_train_loader

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

    def load_mixture(self, num_workers: int, batches: int, weights: tuple = (0.5, 0.3, 0.2)) -> dict:
        """The loader over a blend of as many shard sets as `weights` (the corpus's documents dealt out
        round-robin, tokenized with the same tokenizer; built on first use)."""
        import json

        from loom.data.config import MixtureSource
        from loom.data.mixture import build_mixture_loader
        from loom.data.shards import preprocess

        sources = []
        for index, weight in enumerate(weights):
            folder = os.path.join(self.work, f"mixture-{index}")
            if not os.path.isdir(folder):
                text = os.path.join(self.work, f"mixture-{index}.jsonl")
                with open(text, "w", encoding="utf-8") as f:
                    for document in self.documents[index :: len(weights)]:
                        f.write(json.dumps({"text": document}) + "\n")
                preprocess(
                    text,
                    self.tokenizer_model,
                    folder,
                    seq_length=self.seq,
                    samples_per_shard=64,
                    num_workers=1,
                    progress=False,
                )
            sources.append(MixtureSource(folder, weight=weight, name=f"part{index}"))
        loader = build_mixture_loader(sources, self.micro_batch, num_workers=num_workers, seed=0)
        start = time.perf_counter()
        tokens = 0
        try:
            for _ in range(batches):
                tokens += next(loader).numel()
        finally:
            seconds = time.perf_counter() - start
            loader.close()
        return {"tokens": tokens, "seconds": seconds, "sources": len(weights)}

    def close(self) -> None:
        self.tmp.cleanup()
