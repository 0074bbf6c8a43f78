"""One DeepSpeed engine per rank around that rank's pipeline stage, and the schedule↔ZeRO glue.

PP = 1: every ZeRO stage 0-3 through `engine.backward` + `engine.step` per micro-batch.
PP > 1: the 1F1B schedule (interleaved with `parallel.virtual_stages` > 1) drives backward on
`engine.module`; the DeepSpeed optimizer only reduces and steps. ZeRO-0/1 reduce once after the
schedule; ZeRO-2 reduces per micro-batch (and chunk) through the schedule's hooks (DeepSpeed's own
PipelineEngine cannot do that). ZeRO-3 needs PP = 1.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from loom.model.parallel import comm
from loom.model.parallel.config import ParallelConfig
from loom.model.parallel.groups import Layout, MegatronMPU
from loom.model.parallel.pipeline import forward_backward_1f1b
from loom.model.parallel.pipeline_interleaved import forward_backward_interleaved
from loom.model.parallel.zero_state import (
    zero1_reduce_after_pipeline,
    zero2_begin_micro_batch,
    zero2_end_micro_batch,
)


def deepspeed_config(
    parallel: ParallelConfig, micro_batch_size: int, dp: int, bf16: bool, grad_clip: float, overlay: dict | None = None
) -> dict:
    """The engine config, generated from Loom's config (one source of truth)."""
    # PP>1 with ZeRO-0/1 reduces once per step, so DeepSpeed sees one "micro-batch" per step
    per_step_micro = parallel.microbatches if (parallel.pipeline == 1 or parallel.zero_stage == 2) else 1
    per_micro_size = micro_batch_size * parallel.microbatches // per_step_micro
    bucket = parallel.reduce_bucket_size
    cfg = {
        "train_micro_batch_size_per_gpu": per_micro_size,
        "gradient_accumulation_steps": per_step_micro,
        "train_batch_size": per_micro_size * per_step_micro * dp,
        # fp32 ZeRO-0 has no DeepSpeed optimizer wrapper to report the norm: Loom clips it itself
        "gradient_clipping": 0.0 if (parallel.zero_stage == 0 and not bf16) else grad_clip,
        "steps_per_print": 10**12,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": parallel.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 0,
        },
        "bf16": {"enabled": bf16},
        "wall_clock_breakdown": False,
    }
    if parallel.zero_stage in (1, 2):  # ZeRO-3 keeps DeepSpeed's default (on)
        cfg["zero_optimization"]["overlap_comm"] = parallel.overlap_comm
    for key, value in (overlay or {}).items():
        cfg[key] = value
    return cfg


def zero3_init_context(parallel: ParallelConfig, ds_config: dict):
    """ZeRO-3 partitions parameters as they are built; the DP group must be explicit, or
    DeepSpeed partitions over the world and copies one TP shard everywhere (silently wrong)."""
    if parallel.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    mpu = MegatronMPU()
    return deepspeed.zero.Init(
        data_parallel_group=mpu.get_data_parallel_group(), mpu=mpu, config_dict_or_path=ds_config
    )


@dataclass
class StepResult:
    loss: float
    grad_norm: float


class ShardedStage:
    """A pipeline stage wrapped in its DeepSpeed engine; `train_step` runs one optimizer step."""

    def __init__(
        self,
        stage: torch.nn.Module,
        layout: Layout,
        parallel: ParallelConfig,
        ds_config: dict,
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
    ):
        import deepspeed
        from megatron.core import parallel_state as ps

        self.layout, self.parallel = layout, parallel
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=stage, optimizer=optimizer, config=ds_config, mpu=MegatronMPU()
        )
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        tied = getattr(stage, "tied_across_stages", False) and (layout.is_first_stage or layout.is_last_stage)
        self.embedding_group = ps.get_embedding_group() if tied else None
        self.model_parallel_group = ps.get_model_parallel_group()
        self.own_clipping = parallel.zero_stage == 0 and not ds_config["bf16"]["enabled"]
        self.grad_clip = grad_clip
        # losses and Loom's own grad norm reduce in fp32, or in float64 for a float64 model (the equivalence tests)
        self.reduce_dtype = torch.float64 if next(stage.parameters()).dtype == torch.float64 else torch.float32
        self._own_norm = 0.0
        if self.own_clipping:
            self._guard_optimizer_step()
        # fp32 ZeRO-0 on one DP rank: DeepSpeed would still flatten every gradient into buckets, "all-reduce"
        # them over the one rank and copy them back (3 % of a step in `loom bench`'s profile); nothing to sum
        self.reduces_over_dp = not (self.own_clipping and layout.dp == 1)
        if not self.reduces_over_dp:
            self.engine.enable_backward_allreduce = False

    @property
    def module(self):
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(
        self, microbatches: list[torch.Tensor], step: int, specs: dict, forward_kwargs: dict | None = None
    ) -> StepResult:
        """Forward+backward over this rank's micro-batches, reduce, clip and step."""
        from loom.techniques.aux_loss import set_aux_loss_scale

        set_aux_loss_scale(1.0 / len(microbatches))
        engine, module = self.engine, self.engine.module
        extra = forward_kwargs or {}

        # PP = 1 goes through engine.forward, which tells ZeRO a new micro-batch starts (ZeRO-3
        # accumulates per micro-step on that signal). Under 1F1B several forwards precede their
        # backwards, so there the stage module is called directly, as DeepSpeed's pipeline does.
        call = engine if self.layout.pp == 1 else module

        def stage_forward(tokens, received, chunk=0):
            return call(tokens, received, step=step, chunk=chunk, **extra)

        device = microbatches[0].device
        schedule = self._pipeline_schedule()
        if self.layout.pp == 1:
            losses = forward_backward_1f1b(
                stage_forward,
                microbatches,
                self.pp_group,
                specs,
                device,
                backward=lambda tensors, grads: engine.backward(tensors[0], scale_wrt_gas=False),
                after_backward=lambda i, last: self._optimizer_step(last),
            )
        elif self.parallel.zero_stage == 2:
            # the hooks run around every backward, one per micro-batch and chunk: DeepSpeed reduces the
            # gradients each produced (one chunk's) and marks the step's boundary at the rank's last one
            losses = schedule(
                stage_forward,
                microbatches,
                self.pp_group,
                specs,
                device,
                before_backward=self._zero2_before_backward,
                after_backward=self._zero2_after_backward,
            )
            for _ in microbatches:  # the engine counts micro-steps; only the last one steps
                engine.step()
        else:
            losses = schedule(stage_forward, microbatches, self.pp_group, specs, device)
            self._sync_tied_embedding_grads()
            if self.parallel.zero_stage == 1:
                zero1_reduce_after_pipeline(engine)
            elif self.reduces_over_dp:
                engine.allreduce_gradients()
            self._optimizer_step(True)
        norm = self._own_norm if self.own_clipping else engine.get_global_grad_norm()
        return StepResult(loss=self._global_mean_loss(losses, device), grad_norm=float(norm or 0.0))

    def _pipeline_schedule(self):
        """1F1B, or interleaved 1F1B over this rank's model chunks."""
        virtual_stages = self.parallel.virtual_stages
        if virtual_stages == 1:
            return forward_backward_1f1b

        def interleaved(*args, **kwargs):
            return forward_backward_interleaved(*args, virtual_stages=virtual_stages, **kwargs)

        return interleaved

    # ------------------------------------------------------------------ fp32 ZeRO-0 clipping
    def _optimizer_step(self, at_boundary: bool) -> None:
        if at_boundary and self.own_clipping:
            self._own_norm = self._clip_global_grad_norm()
        self.engine.step()

    def _clip_global_grad_norm(self) -> float:
        """The norm over TP, PP and DP exactly once per weight: sharded weights on every TP rank,
        replicated ones on TP rank 0, a tied pipeline copy only on its first stage."""
        grads, counted = [], []
        for p in self.engine.module.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if getattr(p, "ds_pipe_replicated", False):
                continue
            if getattr(p, "tensor_model_parallel", False) or self.layout.tp_rank == 0:
                counted.append(p.grad.detach())
        # one multi-tensor pass over the gradients (no per-parameter temporaries), summed as squares
        local = torch.nn.utils.get_total_norm(counted, foreach=True) if counted else torch.zeros(())
        squares = local.to(device=torch.device(self.engine.device), dtype=self.reduce_dtype).pow(2)
        comm.all_reduce(squares, group=self.model_parallel_group)
        norm = float(squares.sqrt())
        if self.grad_clip > 0 and math.isfinite(norm) and norm > self.grad_clip:
            torch._foreach_mul_(grads, self.grad_clip / (norm + 1e-6))
        return norm

    def _guard_optimizer_step(self) -> None:
        """Skip the optimizer step on a non-finite gradient norm (DeepSpeed's ZeRO optimizers do
        this themselves; plain ZeRO-0 would write NaN into the weights)."""
        optimizer = self.engine.optimizer
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            if not math.isfinite(self._own_norm):
                optimizer.zero_grad(set_to_none=True)
                return None
            return step(*args, **kwargs)

        optimizer.step = guarded_step

    def _zero2_before_backward(self, index: int, is_last: bool) -> None:
        zero2_begin_micro_batch(self.engine, is_last)

    def _zero2_after_backward(self, index: int, is_last: bool) -> None:
        zero2_end_micro_batch(self.engine)

    def _sync_tied_embedding_grads(self) -> None:
        module = self.engine.module
        if not getattr(module, "tied_across_stages", False) or self.embedding_group is None:
            return
        weight = module.embedding.weight if module.is_first else module.output_layer.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        comm.all_reduce(weight.grad, group=self.embedding_group)

    def _global_mean_loss(self, losses: list[torch.Tensor], device) -> float:
        """Mean micro-batch loss over the DP group, known on every rank (losses live on the last stage)."""
        dtype = self.reduce_dtype
        local = torch.stack(losses).mean().to(dtype) if losses else torch.zeros((), dtype=dtype, device=device)
        if self.layout.pp > 1:
            comm.all_reduce(local, group=self.pp_group)
        if self.layout.dp > 1:
            comm.all_reduce(local, group=self.dp_group)
            local /= self.layout.dp
        return float(local)
