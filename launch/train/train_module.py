"""The per-batch seam between the trainer loop and the parallel model (OLMo-core's train module):
one optimizer step, one evaluation, the techniques' periodic upkeep and their scalars."""

from __future__ import annotations

import math

import torch

from loom.launch.runtime.faults import nan_injection
from loom.model.parallel import comm
from loom.model.parallel.groups import Layout
from loom.model.parallel.pipeline import forward_only
from loom.model.parallel.pipeline_interleaved import forward_only_interleaved
from loom.model.parallel.zero import ShardedStage


class TrainModule:
    def __init__(
        self,
        sharded: ShardedStage,
        layout: Layout,
        micro_batch_size: int,
        seq_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.sharded, self.layout = sharded, layout
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.dtype, self.device = dtype, device
        self.specs = self.module.carry_specs(micro_batch_size, seq_length, dtype)

    @property
    def module(self):
        return self.sharded.module

    @property
    def engine(self):
        return self.sharded.engine

    def train_batch(self, microbatches: list[torch.Tensor], step: int, lr: float) -> dict:
        self.before_step(step)
        self.sharded.set_lr(lr)
        self.module.train()
        batches = [mb.to(self.device, non_blocking=True) for mb in microbatches]
        with nan_injection(self.module, step):
            result = self.sharded.train_step(batches, step, self.specs)
        finite = math.isfinite(result.loss) and math.isfinite(result.grad_norm)
        return {"train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": lr, "finite": finite}

    def before_step(self, step: int) -> None:
        """The techniques' periodic, non-differentiable upkeep."""
        from loom.launch.train.technique_upkeep import upkeep

        upkeep(self.sharded, self.layout, step)

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """Mean held-out loss over every rank's eval batches (token-weighted) and its perplexity."""
        module = self.module
        module.eval()
        total = torch.zeros(2, dtype=torch.float64)
        pp_group = self.sharded.pp_group
        for batch in batches:
            batch = batch.to(self.device)
            specs = module.carry_specs(batch.shape[0], batch.shape[1] - 1, self.dtype)
            stage_forward = lambda mb, rec, chunk=0: module(mb, rec, chunk=chunk, update_ema=False)
            if module.virtual_stages > 1:
                out = forward_only_interleaved(
                    stage_forward, [batch], pp_group, specs, self.device, module.virtual_stages
                )
            else:
                out = forward_only(stage_forward, [batch], pp_group, specs, self.device)
            if out:
                tokens = batch.shape[0] * (batch.shape[1] - 1)
                total += torch.tensor([float(out[0]) * tokens, tokens], dtype=torch.float64)
        module.train()
        if self.layout.pp > 1:
            comm.all_reduce(total, group=pp_group)
        comm.all_reduce(total, group=self.sharded.dp_group)
        if total[1] == 0:
            return {}
        loss = float(total[0] / total[1])
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def technique_scalars(self) -> dict[str, float]:
        """Every technique module's `metrics()` from the last forward, tagged by where it sits,
        gathered from all pipeline stages (collective over the PP group)."""
        out = {}
        for name, sub in self.module.named_modules():
            metrics = getattr(sub, "metrics", None)
            if callable(metrics) and sub is not self.module:
                for key, value in metrics().items():
                    value = float(value.detach()) if torch.is_tensor(value) else float(value)
                    out[f"techniques/{name}/{key}"] = value
        hcma = getattr(self.module, "hcma", None)
        if hcma is not None:
            for key, value in hcma.metrics().items():
                out[f"techniques/hcma/{key}"] = float(value.detach()) if torch.is_tensor(value) else float(value)
        if self.layout.pp > 1:
            stages = comm.all_gather_object(out, group=self.sharded.pp_group)
            out = {k: v for stage in stages for k, v in stage.items()}
        return out
