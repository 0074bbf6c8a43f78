"""Loom's trainer path as a benchmark workload, with its per-rank memory accounting."""

from __future__ import annotations

import math
import statistics
import time
import warnings

from loom.launch.bench.memory import SavedTensorMeter, optimizer_tensors, tensor_bytes
from loom.launch.bench.shapes import Shape, model_config, token_batch
from loom.launch.bench.workloads import Workload, init_grid
from loom.launch.train.train_module import TrainModule
from loom.model.parallel.parallelize import default_device
from loom.model.parallel.zero_state import gradient_partitions, local_partition, local_shape, reduce_buckets


class LoomTrainer(Workload):
    """Loom's own training path: `parallelize` (DeepSpeed engine, ZeRO stage, own 1F1B schedule) and the
    trainer's `TrainModule.train_batch` (the techniques' upkeep, the learning rate, the step)."""

    def __init__(
        self,
        rank,
        world,
        shape: Shape,
        tech=None,
        tp: int = 1,
        pp: int = 1,
        zero: int = 0,
        microbatches: int = 1,
        seed: int = 0,
        compile: bool = False,
        overlap_comm: bool = False,
        sequence_parallel: bool = False,
        virtual_stages: int = 1,
    ):
        import torch

        from loom.model.parallel.config import ParallelConfig
        from loom.model.parallel.optim import OptimConfig
        from loom.model.parallel.parallelize import parallelize
        from loom.techniques.config import TechniquesConfig

        self.layout = layout = init_grid(tp, pp)
        if zero == 3:  # zero.Init reads the DP size through deepspeed.comm, which nothing has started yet
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
        self.shape, self.tech = shape, tech or TechniquesConfig()
        per_rank = shape.batch // layout.dp
        if per_rank * layout.dp != shape.batch or per_rank % microbatches:
            raise ValueError(f"batch {shape.batch} does not split into DP {layout.dp} x {microbatches} micro-batches")
        self.micro = per_rank // microbatches
        parallel = ParallelConfig(
            tensor=tp,
            pipeline=pp,
            zero_stage=zero,
            microbatches=microbatches,
            overlap_comm=overlap_comm,
            sequence_parallel=sequence_parallel,
            virtual_stages=virtual_stages,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if compile:  # inductor's default compile-worker pool would fork from this forked worker
                import torch._inductor.config

                torch._inductor.config.compile_threads = 1
            self.sharded = parallelize(
                model_config(shape),
                self.tech,
                layout,
                parallel,
                optim=OptimConfig(),
                micro_batch_size=self.micro,
                seed=seed,
                precision="fp32",
                compile=compile,
            )
        self.lr = OptimConfig().lr
        self.module = TrainModule(self.sharded, layout, self.micro, shape.seq, torch.float32, default_device())
        full = token_batch(shape, shape.batch)
        mine = full[layout.dp_rank * per_rank : (layout.dp_rank + 1) * per_rank]
        self.batches = list(mine.split(self.micro))
        self.tokens_per_step = shape.tokens_per_step  # global: every DP rank's share together
        self.step_index = 0

    def param_count(self) -> int:
        return sum(math.prod(local_shape(p)) for p in self.sharded.module.parameters())

    def step(self) -> None:
        self.last = self.module.train_batch(self.batches, self.step_index, self.lr)
        self.step_index += 1

    # ------------------------------------------------------------------ memory accounting
    def state_bytes(self) -> dict:
        """Bytes this rank holds between steps: parameters (its ZeRO-3 partition), gradients,
        optimizer state (moments and DeepSpeed's fp32 master partitions), buffers and technique state."""
        import torch

        engine, module = self.sharded.engine, self.sharded.module
        params = list(module.parameters())
        held = [local_partition(p) for p in params]
        out = {
            "params": tensor_bytes(held),
            "params_full": 4 * sum(int(torch.Size(local_shape(p)).numel()) for p in params),
            "buffers": tensor_bytes(module.buffers()),
        }
        out["grads"] = tensor_bytes([p.grad for p in params] + gradient_partitions(engine.optimizer))
        out["buckets"] = tensor_bytes(reduce_buckets(engine.optimizer))
        out["optimizer"] = tensor_bytes(optimizer_tensors(engine.optimizer))
        hcma = getattr(module, "hcma", None)
        out["technique_state"] = tensor_bytes(getattr(hcma, "_state", {}).values()) if hcma is not None else 0
        return out

    def memory_report(self) -> dict:
        """One more step under a saved-tensor meter (activations), then the rank's state bytes."""
        import torch

        engine, module = self.sharded.engine, self.sharded.module
        meter = SavedTensorMeter(exclude=list(module.parameters()), hidden_size=self.shape.hidden)
        grads = {}

        def before_optimizer_step(*_):  # gradients exist only between backward and the step
            grads["bytes"] = tensor_bytes([p.grad for p in module.parameters()] + gradient_partitions(engine.optimizer))

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
        out["activations_hidden_width"] = meter.residual_bytes
        out["rss_high_water_kb"] = self.rss_high_water_kb()
        if torch.cuda.is_available():
            out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        return out

    def hcma_refresh_seconds(self, repeats: int = 2) -> float:
        from loom.launch.train.technique_upkeep import _refresh_hcma

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
        between = tensor_bytes([p.grad for p in engine.module.parameters()] + gradient_partitions(engine.optimizer))
        buckets = tensor_bytes(reduce_buckets(engine.optimizer))
        engine.step()
        for mb in self.batches[1:]:
            engine.backward(engine(mb, None, step=self.step_index))
            engine.step()
        self.step_index += 1
        out = self.state_bytes()
        out["grads_between_microbatches"] = between
        out["buckets"] = max(buckets, out["buckets"])
        return out
