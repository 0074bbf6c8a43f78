"""The evaluation network: this rank's pipeline stage of a checkpoint, rebuilt at the checkpoint's
tensor/pipeline layout (the extra factor of the world is data parallelism), with teacher-forced
and greedy forwards that go through the pipeline (`forward_only`) and keep logits vocab-parallel."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from loom.launch.checkpoint.meta import read_config, read_meta
from loom.launch.eval.checkpoint import checkpoint_layout, load_stage_weights
from loom.techniques.metrics import entropy as ent_m


class EvalModel:
    """This rank's pipeline stage of the checkpoint, in eval mode, plus the process groups."""

    def __init__(self, folder: Path, trust_pickles: bool = False):
        from megatron.core import parallel_state as ps

        from loom.model.parallel import cpu_compat
        from loom.model.parallel.config import ParallelConfig
        from loom.model.parallel.groups import init_parallel_groups
        from loom.model.parallel.parallelize import build_stage, default_device, resolve_dtype

        self.folder = folder
        self.meta = read_meta(folder)
        self.cfg = read_config(folder)
        lay = checkpoint_layout(folder, self.cfg)
        tp, pp = lay["tp"], lay["pp"]
        world = dist.get_world_size()
        if world % (tp * pp):
            raise ValueError(
                f"the checkpoint has TP={tp} × PP={pp}: run `loom eval` with a multiple of {tp * pp} "
                f"processes (got {world})"
            )
        cpu_compat.apply()
        self.layout = init_parallel_groups(
            ParallelConfig(tensor=tp, pipeline=pp, zero_stage=0, timeout_s=self.cfg.parallel.timeout_s)
        )
        self.device = default_device()
        self.dtype = resolve_dtype(self.cfg.train.precision)
        self.module = build_stage(
            self.cfg.model, self.cfg.techniques, self.layout, self.cfg.train.seed, self.dtype, self.device
        )
        self.zero_stage = lay["zero"]
        load_stage_weights(
            self.module, folder, mp_rank=self.layout.pp_rank * tp + self.layout.tp_rank, trust_pickles=trust_pickles
        )
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.seq_length = self.cfg.model.seq_length
        self.step = int(self.meta.get("state", {}).get("step", 0))
        self.last_stage_rank = dist.get_global_rank(self.pp_group, dist.get_world_size(self.pp_group) - 1)
        if self.module.is_last:
            w = self.module.output_layer.weight
            if w is None:
                w = self.module.embedding.weight
            self.vocab_start = self.layout.tp_rank * w.shape[0]
            self.column_scale = 1.0 / w.float().norm(dim=-1).clamp_min(1e-12)

    # ---------------------------------------------------------------- ownership
    @property
    def reports_stats(self) -> bool:
        """Last stage, TP rank 0: owns the per-token statistics of its replica."""
        return self.module.is_last and self.layout.tp_rank == 0

    @property
    def reports_hidden(self) -> bool:
        return self.layout.tp_rank == 0

    def points(self) -> list[int]:
        """Residual points h^ℓ this stage produces (0 = embedding output)."""
        pts = [i + 1 for i in self.module.layer_range]
        return ([0] if self.module.is_first else []) + pts

    # ---------------------------------------------------------------- forwards
    def forward(self, rows, capture: bool = False, embed_delta=None) -> tuple[Optional[dict], dict]:
        """Teacher-forced pass of `rows [b, s+1]`. Returns (per-token stats `[b, s]` on the reporting
        rank else None, {point: hidden [b, s, d]} for this stage's points when `capture`)."""
        module = self.module
        tokens = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.device)
        b, s = tokens.shape[0], tokens.shape[1] - 1
        captured: dict[int, torch.Tensor] = {}
        handles = []
        if capture:
            if module.is_first:
                handles.append(
                    module.embedding.register_forward_hook(
                        lambda m, i, o: captured.__setitem__(0, o.detach().float().transpose(0, 1))
                    )
                )
            for idx, block in module.layers.items():
                handles.append(
                    block.register_forward_hook(
                        lambda m, i, o, p=int(idx) + 1: captured.__setitem__(p, o.detach().float().transpose(0, 1))
                    )
                )
        if embed_delta is not None and module.is_first:
            handles.append(module.embedding.register_forward_hook(lambda m, i, o: embed_delta(o)))

        def stage_forward(mb, received):
            out = module(mb, received, update_ema=False, return_logits=True)
            if not module.is_last:
                return out
            return self.token_stats(out, mb[:, 1:])

        from loom.model.parallel.pipeline import forward_only

        try:
            outs = forward_only(
                stage_forward, [tokens], self.pp_group, module.carry_specs(b, s, self.dtype), self.device
            )
        finally:
            for h in handles:
                h.remove()
        stats = outs[0] if (outs and self.reports_stats) else None
        return stats, captured

    def token_stats(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        out = ent_m.vocab_parallel_token_stats(
            logits, labels.t(), self.vocab_start, self.tp_group, column_scale=self.column_scale
        )
        return {k: v.t().cpu() for k, v in out.items()}

    @torch.no_grad()
    def generate(self, prompts, new_tokens: int, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Greedy continuation of equal-length `prompts [b, P]` (no early stop, no KV cache): the
        ids and the full-vocabulary entropies `[b, new_tokens]`, identical on every rank of the
        replica. `limit` keeps only the last `limit` tokens as context (None: no limit)."""
        from loom.model.parallel.pipeline import forward_only

        module = self.module
        seq = torch.as_tensor(np.asarray(prompts), dtype=torch.long, device=self.device)
        b = seq.shape[0]
        ids = torch.zeros(b, new_tokens, dtype=torch.long)
        ents = torch.zeros(b, new_tokens, dtype=torch.float64)
        for t in range(new_tokens):
            window = seq if limit is None else seq[:, -limit:]
            tokens = torch.cat([window, window[:, -1:]], dim=1)  # the label column is unused

            def stage_forward(mb, received):
                out = module(mb, received, update_ema=False, return_logits=True)
                if not module.is_last:
                    return out
                last = out[-1]  # [b, V/tp]
                return torch.stack(
                    [
                        ent_m.vocab_parallel_argmax(last, self.vocab_start, self.tp_group).double(),
                        ent_m.vocab_parallel_entropy(last, self.tp_group).double(),
                    ]
                )

            outs = forward_only(
                stage_forward, [tokens], self.pp_group, module.carry_specs(b, window.shape[1], self.dtype), self.device
            )
            result = outs[0] if outs else torch.zeros(2, b, dtype=torch.float64, device=self.device)
            if dist.get_world_size(self.pp_group) > 1:
                dist.broadcast(result, src=self.last_stage_rank, group=self.pp_group)
            next_ids = result[0].long()
            ids[:, t], ents[:, t] = next_ids.cpu(), result[1].cpu()
            seq = torch.cat([seq, next_ids[:, None].to(self.device)], dim=1)
        return ids.numpy(), ents.numpy()

    def full_embedding_table(self) -> Optional[torch.Tensor]:
        """The real rows of the input embedding, gathered over TP on the first stage (else None).
        Collective over the first stage's TP group."""
        if not self.module.is_first:
            return None
        w = self.module.embedding.weight.detach().float()
        if self.layout.tp > 1:
            parts = [torch.empty_like(w) for _ in range(self.layout.tp)]
            dist.all_gather(parts, w, group=self.tp_group)
            w = torch.cat(parts)
        return w[: self.cfg.model.vocab_size].cpu()
