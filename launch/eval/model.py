"""The evaluation network: this rank's pipeline stage of a checkpoint, rebuilt at the checkpoint's
tensor/pipeline layout (the extra factor of the world is data parallelism), with teacher-forced
and greedy forwards that go through the pipeline (`forward_only`) and keep logits vocab-parallel;
greedy decoding uses the KV cache (`launch.generate.decode`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from loom.launch.checkpoint.meta import read_config, read_meta
from loom.launch.eval.checkpoint import checkpoint_layout, load_stage_weights
from loom.model.parallel import comm
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
        # an interleaved checkpoint is evaluated with one chunk per rank (its weights are consolidated on
        # load); only stage-local CMR, whose network depends on the chunks, cannot be
        tech = self.cfg.techniques
        if lay.get("vp", 1) > 1 and tech.cmr.enabled and tech.cmr.stage_local:
            raise ValueError(
                f"the checkpoint interleaves {lay['vp']} model chunks per rank and CMR is stage-local: reshard it "
                "to parallel.virtual_stages 1 with the same number of pipeline stages to evaluate it"
            )
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
    def generate(
        self, prompts, new_tokens: int, limit: Optional[int] = None, use_cache: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy continuation of `prompts` (lists of ids; left-padded when their lengths differ) for
        `new_tokens` steps (no early stop): the ids and the full-vocabulary entropies `[b, new_tokens]`,
        identical on every rank of the replica. `limit` keeps only the last `limit` positions as context
        (None: no limit). Decodes with the KV cache at any TP×PP layout (`launch.generate.decode`: every
        stage keeps its own blocks' state); `use_cache=False` recomputes the whole prefix every step."""
        from loom.launch.generate.decode import StageRunner, decode

        def choose(last: torch.Tensor) -> torch.Tensor:  # [b, V/tp] → [b, 2]: the arg-max and the entropy
            return torch.stack(
                [
                    ent_m.vocab_parallel_argmax(last, self.vocab_start, self.tp_group).double(),
                    ent_m.vocab_parallel_entropy(last, self.tp_group).double(),
                ],
                dim=1,
            )

        runner = StageRunner(self.module, choose, width=2, pp_group=self.pp_group, dtype=self.dtype, device=self.device)
        rows = [list(map(int, p)) for p in prompts]
        out = decode(runner, rows, new_tokens, context=limit, use_cache=use_cache)
        return np.asarray(out.ids, dtype=np.int64), out.extras[..., 0].numpy()

    def full_embedding_table(self) -> Optional[torch.Tensor]:
        """The real rows of the input embedding, gathered over TP on the first stage (else None).
        Collective over the first stage's TP group."""
        if not self.module.is_first:
            return None
        w = self.module.embedding.weight.detach().float()
        if self.layout.tp > 1:
            w = torch.cat(comm.all_gather(w, group=self.tp_group))
        return w[: self.cfg.model.vocab_size].cpu()
