"""A Llama-style GPT split into pipeline stages: embedding → blocks → final norm → vocab-parallel head.

`GPTStage` is the part of the network one pipeline rank holds (the whole network when PP=1). Its
parameter names use global block indices (`layers.7.…`), so every layout names every weight the
same way; `model.init` keys the initial values on those names. Under the interleaved schedule
(`parallel.virtual_stages` v > 1) a rank holds v model chunks, non-adjacent slices of the blocks, and
`forward(..., chunk=c)` runs one of them.

`forward(..., cache=InferenceCache)` is the decoding path (`model/inference.py`): a prompt, then one
token at a time, each call computing only the new positions; the same stage code, so it runs at any
TP×PP layout (every stage keeps the state of its own blocks).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn

from loom.model.attention import _no_init
from loom.model.block import Block, residual_point
from loom.model.config import ModelConfig
from loom.model.context import ForwardContext
from loom.model.inference import InferenceCache
from loom.model.init import block_seed
from loom.model.norm import RMSNorm
from loom.model.parallel.sequence import sequence_shards_of, unsharded
from loom.model.parallel.tp_rules import mark_tensor_parallel
from loom.model.precision import at_least_fp32
from loom.model.rope import RotaryEmbedding
from loom.model.technique_plan import TechniquePlan
from loom.techniques.aux_loss import attach_aux_loss
from loom.techniques.cmr import LayerCapture
from loom.techniques.config import TechniquesConfig
from loom.techniques.doc_meta import document_metadata
from loom.techniques.hcma import HCMA


def seeded(seed: int, index: int, build):
    """Build a module under its own seed, so its random init does not depend on the stage."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(block_seed(seed, index))
        return build()


def stage_layer_range(num_layers: int, pp: int, pp_rank: int, virtual_stages: int = 1, chunk: int = 0) -> range:
    """The global blocks of model chunk `chunk` on pipeline rank `pp_rank`. The pipeline has pp·v virtual
    stages of equal size; virtual stage chunk·pp + pp_rank runs on that rank, so consecutive virtual
    stages sit on consecutive ranks and the last rank hands chunk c on to rank 0's chunk c+1."""
    per_stage = num_layers // (pp * virtual_stages)
    virtual_stage = chunk * pp + pp_rank
    return range(virtual_stage * per_stage, (virtual_stage + 1) * per_stage)


class GPTStage(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        tech: TechniquesConfig,
        layer_config,
        *,
        tp: int = 1,
        pp: int = 1,
        pp_rank: int = 0,
        seed: int = 0,
        virtual_stages: int = 1,
    ):
        super().__init__()
        self.cfg, self.tech = cfg, tech
        self.plan = TechniquePlan.from_config(tech, cfg.num_layers)
        # rank-level: this rank holds the embedding (in its chunk 0) / the head (in its last chunk)
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp - 1
        self.tied_across_stages = cfg.tie_embeddings and pp > 1
        self.virtual_stages = virtual_stages
        self.chunk_ranges = [
            stage_layer_range(cfg.num_layers, pp, pp_rank, virtual_stages, chunk) for chunk in range(virtual_stages)
        ]
        # every block this rank holds, in order (one range without interleaving)
        self.layer_range = self.chunk_ranges[0] if virtual_stages == 1 else [i for r in self.chunk_ranges for i in r]
        self.padded_vocab = cfg.padded_vocab_size(tp)
        # megatron's layers were built in SP mode: the residual stream between them holds s/TP rows
        self.sequence = sequence_shards_of(layer_config)
        d = cfg.hidden_size
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.point = 0  # the embedding output is h^0
        if self.is_first:
            self.embedding = VocabParallelEmbedding(self.padded_vocab, d, init_method=_no_init, config=layer_config)
            if tech.cmr.enabled and 0 in self.plan.cmr_sources:
                self.capture = seeded(seed, -1, lambda: LayerCapture(d, tech.cmr.rank))
                self.capture_slot = self.plan.cmr_sources.index(0)
        self.layers = nn.ModuleDict(
            {
                str(i): seeded(seed, i, lambda i=i: Block(cfg, tech, self.plan, i, layer_config, tp))
                for i in self.layer_range
            }
        )
        if self.is_last:
            self.final_norm = RMSNorm(d, cfg.norm_eps)
            share_first_stage_weight = cfg.tie_embeddings and pp == 1
            self.output_layer = ColumnParallelLinear(
                d,
                self.padded_vocab,
                config=layer_config,
                init_method=_no_init,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=share_first_stage_weight,
            )
            if self.tied_across_stages:
                # DeepSpeed skips params marked so when it sums grad norms, so the tied copy counts once
                self.output_layer.weight.ds_pipe_replicated = True
        mark_tensor_parallel(self)
        # HCMA owns no parameters (not an nn.Module); its refresh runs between steps (launch/technique_upkeep.py)
        self.hcma = HCMA(tech.hcma, d) if (tech.hcma.enabled and self.is_first) else None

    # ----------------------------------------------------------------------------------- forward
    def make_context(self, input_ids: torch.Tensor, step: int = 0, chunk: int = 0) -> ForwardContext:
        tokens = input_ids.t()  # [s, b]
        pos, start, doc = document_metadata(tokens, self.cfg.eos_id)
        dtype = next(self.parameters()).dtype
        cos, sin = self.rope.cos_sin(tokens.shape[0], tokens.device, dtype)
        shards = self.sequence
        if shards is not None and tokens.shape[0] % shards.size:
            raise ValueError(
                f"sequence parallelism splits the sequence over {shards.size} ranks: {tokens.shape[0]} tokens "
                "do not divide evenly"
            )
        rows = (lambda t: t) if shards is None else shards.local  # the rows of this rank's residual stream
        return ForwardContext(
            tokens=rows(tokens),
            pos=rows(pos),
            start=rows(start),
            doc=rows(doc),
            cos=cos,
            sin=sin,
            plan=self.plan,
            step=step,
            training=self.training,
            stage_first_point=self.chunk_ranges[chunk].start,
            bank=[None] * len(self.plan.cmr_sources),
            sequence=shards,
            full_tokens=tokens if shards is not None else None,
            full_doc=doc if shards is not None else None,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        received: dict | None = None,
        step: int = 0,
        chunk: int = 0,
        update_ema: bool = True,
        return_logits: bool = False,
        cache: InferenceCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        """tokens: [b, s+1] ids (inputs and shifted labels). received: tensors from the previous stage.
        Returns the mean LM loss on the last stage (or the vocab-parallel logits [s, b, V_pad/tp] with
        `return_logits`), else the dict of tensors for the next stage. `chunk` picks the model chunk
        under the interleaved schedule; the embedding runs in chunk 0 of the first rank and the head in
        the last chunk of the last rank.

        With `cache` (decoding): tokens are [b, n] new ids without labels, `attention_mask` [b, n] marks
        the real ones (left padding); the last stage returns the logits of those n positions."""
        if cache is not None:
            if self.virtual_stages > 1:
                raise ValueError("decoding needs a stage built with virtual_stages 1 (checkpoints load at any layout)")
            if self.sequence is not None:  # a few new tokens per call: decoding runs on whole sequences
                with unsharded(self):
                    return self._decode(tokens, received, cache, attention_mask)
            return self._decode(tokens, received, cache, attention_mask)
        input_ids, labels = tokens[:, :-1], tokens[:, 1:]
        ctx = self.make_context(input_ids, step, chunk)
        ctx.update_ema = update_ema
        h = self._stage_input(ctx, received, embeds=self.is_first and chunk == 0)
        for index in self.chunk_ranges[chunk]:
            h = self.layers[str(index)](h, ctx)
        if not (self.is_last and chunk == self.virtual_stages - 1):
            return self._stage_output(h, ctx)
        logits = self.logits(h)
        if return_logits:
            return logits
        loss = vocab_parallel_cross_entropy(at_least_fp32(logits), labels.t().contiguous())
        return loss.mean()

    def _decode(self, input_ids, received: dict | None, cache: InferenceCache, attention_mask):
        n = input_ids.shape[1]
        if cache.length and n > 1:  # after the prompt, LCM and SCR continue one token at a time
            outs = [
                self._decode(
                    input_ids[:, i : i + 1],
                    None if received is None else {k: v[i : i + 1] for k, v in received.items()},
                    cache,
                    None if attention_mask is None else attention_mask[:, i : i + 1],
                )
                for i in range(n)
            ]
            return torch.cat(outs) if self.is_last else {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        tokens = input_ids.t()  # [n, b]
        chunk = cache.begin(tokens, None if attention_mask is None else attention_mask.t().bool(), self.cfg.eos_id)
        cos, sin = self.rope.cos_sin(cache.rope_length(n), tokens.device, next(self.parameters()).dtype)
        ctx = ForwardContext(
            tokens=tokens,
            pos=chunk.pos,
            start=chunk.start,
            doc=chunk.doc,
            cos=cos[:, 0][chunk.positions],  # [n, b, 1, head_dim]: each row at its own position
            sin=sin[:, 0][chunk.positions],
            plan=self.plan,
            training=False,
            update_ema=False,
            stage_first_point=self.layer_range.start,
            bank=[None] * len(self.plan.cmr_sources),
        )
        h = self._stage_input(ctx, received, embeds=self.is_first)
        for block in self.layers.values():
            h = block(h, ctx, cache)
        cache.end()
        return self.logits(h) if self.is_last else self._stage_output(h, ctx)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [s, b, V_pad / tp] from the last block's output."""
        h = self.final_norm(h)
        weight = self.embedding.weight if (self.cfg.tie_embeddings and not self.tied_across_stages) else None
        logits, _ = self.output_layer(h, weight=weight)
        return self._mask_vocab_padding(logits)

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Padding rows exist only for TP divisibility; a huge negative logit keeps them out of the
        softmax (exp underflows to exactly 0), so the loss is the same at every TP size and equals the
        exported model's. Not -inf: megatron's cross-entropy would turn -inf - max into NaN."""
        from megatron.core import parallel_state as ps

        local = logits.shape[-1]
        first = ps.get_tensor_model_parallel_rank() * local
        real = self.cfg.vocab_size - first
        if real >= local:
            return logits
        mask = torch.arange(local, device=logits.device) >= real
        return logits.masked_fill(mask, -1e30 if logits.dtype == torch.float32 else -1e4)

    def _stage_input(self, ctx: ForwardContext, received: dict | None, embeds: bool) -> torch.Tensor:
        s, b = ctx.tokens.shape
        if ctx.bank:
            ctx.bank_template = torch.zeros(s, b, self.tech.cmr.rank, dtype=ctx.cos.dtype, device=ctx.tokens.device)
        if not embeds:
            ctx.rho = received.get("rho")
            if "bank" in received:
                ctx.bank = list(received["bank"].unbind(2))
            return received["hidden"]
        h = self.embedding(ctx.tokens if self.sequence is None else ctx.full_tokens)
        hcma = self.hcma
        if hcma is not None and self.training and hcma.ready and hcma.cfg.mode == "regularizer":
            h = attach_aux_loss(h, hcma.weighted_loss(self.embedding.weight))
        if self.sequence is not None:
            h = self.sequence.scatter(h)  # every TP rank looked up the whole sequence; each keeps its rows
        return residual_point(self, h, ctx)

    def _stage_output(self, h: torch.Tensor, ctx: ForwardContext) -> dict:
        out = {"hidden": h}
        if self.plan.carries_rho(self.tech):
            zeros = torch.zeros(ctx.tokens.shape, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
            out["rho"] = ctx.rho if ctx.rho is not None else zeros
        if self.plan.carries_bank():
            out["bank"] = ctx.bank_tensor()
        return out

    def carry_specs(self, micro_batch: int, seq_len: int, dtype: torch.dtype) -> dict:
        """Name → (shape, dtype) of every tensor sent between stages; the same on all stages. Under
        sequence parallelism each rank sends and receives its rows of the sequence."""
        seq_len = seq_len if self.sequence is None else seq_len // self.sequence.size
        specs = {"hidden": ((seq_len, micro_batch, self.cfg.hidden_size), dtype)}
        if self.plan.carries_rho(self.tech):
            specs["rho"] = ((seq_len, micro_batch), torch.promote_types(dtype, torch.float32))  # SCR's fp32 island
        if self.plan.carries_bank():
            specs["bank"] = ((seq_len, micro_batch, len(self.plan.cmr_sources), self.tech.cmr.rank), dtype)
        return specs
