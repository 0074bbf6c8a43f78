"""Greedy text generation through the parallel model (any TP/PP layout), for the samples a training run
prints: the shared cached decoder (`launch.generate.decode`), every stage keeping its own blocks' state. A
model trained with sequence parallelism decodes unsharded (one new token cannot be split over ranks)."""

from __future__ import annotations

import contextlib

import torch

from loom.launch.generate.decode import StageRunner, decode
from loom.model.parallel.sequence import unsharded


@torch.no_grad()
def greedy_generate(
    module, prompt_ids: list[int], max_new_tokens: int, dtype: torch.dtype, device: torch.device
) -> list[int]:
    """Collective over the model-parallel ranks of one DP replica; every rank returns the same ids (the
    prompt, then the continuation up to and including EOS). The context is the model's training length."""
    from megatron.core import parallel_state as ps

    from loom.techniques.metrics.entropy import vocab_parallel_argmax

    tp_group = ps.get_tensor_model_parallel_group()

    def choose(last: torch.Tensor) -> torch.Tensor:
        start = ps.get_tensor_model_parallel_rank() * last.shape[-1]
        return vocab_parallel_argmax(last, start, tp_group).double()[:, None]

    was_training = module.training
    module.eval()
    try:
        pp_group = ps.get_pipeline_model_parallel_group()
        with unsharded(module) if module.sequence is not None else contextlib.nullcontext():
            runner = StageRunner(module, choose, pp_group=pp_group, dtype=dtype, device=device)
            cfg = module.cfg
            out = decode(runner, [list(prompt_ids)], max_new_tokens, eos_id=cfg.eos_id, context=cfg.seq_length)
    finally:
        module.train(was_training)
    return list(prompt_ids) + out.ids[0]
