"""The techniques inside the parallel model: exact identity at init at every TP/PP layout,
gradient flow at init, and equivalence of TP/PP layouts with all five on."""

import dataclasses

import pytest
import torch

from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import (
    MICRO_BATCH,
    SEQ,
    all_techniques,
    assert_traces_match,
    fixed_batches,
    init_layout,
    layout_trace,
    reference_trace,
    tiny_model,
)

ONE_EACH = ["lcm", "scr", "cmr", "sca", "hcma"]


def _only(name: str) -> TechniquesConfig:
    full, tech = all_techniques(), TechniquesConfig()
    setattr(tech, name, getattr(full, name))
    return tech


def _stage_outputs(rank, world_size, tp, pp, tech_by_name: dict, dtype):
    """Loss and (last-stage) logits of the baseline and of each technique variant, same weights."""
    from megatron.core import parallel_state as ps

    from loom.model.parallel.parallelize import build_stage
    from loom.model.parallel.pipeline import forward_only

    layout = init_layout(rank, tp, pp)
    cfg = tiny_model()
    batch = fixed_batches(1, cfg.vocab_size)[0]
    results = {}
    for name, tech in {"baseline": TechniquesConfig(), **tech_by_name}.items():
        module = build_stage(cfg, tech, layout, seed=0, dtype=dtype)
        if module.hcma is not None:  # refresh so the regulariser is live, not vacuously absent
            module.hcma.refresh(
                module.embedding.weight.detach(),
                layout.tp_rank * module.embedding.weight.shape[0],
                min(
                    module.embedding.weight.shape[0], cfg.vocab_size - layout.tp_rank * module.embedding.weight.shape[0]
                ),
                ps.get_tensor_model_parallel_group(),
            )
        captured = {}

        def fwd(mb, received, module=module):
            out = module(mb, received)
            if module.is_last:
                captured["logits"] = module.logits(captured.get("h")) if "h" in captured else None
            return out

        def keep_final_hidden(mod, args, output, store=captured):
            store["h"] = output

        hook = None
        if module.is_last:
            last_block = list(module.layers.values())[-1]
            hook = last_block.register_forward_hook(keep_final_hidden)
        specs = module.carry_specs(MICRO_BATCH, SEQ, dtype)
        losses = forward_only(fwd, [batch], ps.get_pipeline_model_parallel_group(), specs, torch.device("cpu"))
        if hook is not None:
            hook.remove()
        results[name] = (losses[0].float() if losses else None, captured.get("logits"))
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_identity_at_init_every_layout(tp, pp):
    variants = {name: _only(name) for name in ONE_EACH}
    variants["all"] = all_techniques()
    for dtype in (torch.float32, torch.bfloat16):
        per_rank = run_distributed(_stage_outputs, tp * pp, tp, pp, variants, dtype)
        for rank_results in per_rank:
            base_loss, base_logits = rank_results["baseline"]
            for name, (loss, logits) in rank_results.items():
                if base_loss is None:
                    continue
                assert torch.equal(loss, base_loss), f"{name} changes the step-0 loss at tp{tp} pp{pp} {dtype}"
                assert torch.equal(logits, base_logits), f"{name} changes the step-0 logits at tp{tp} pp{pp}"


def _grads_at_init(rank, world_size):
    from loom.model.parallel.parallelize import build_stage
    from loom.techniques.aux_loss import set_aux_loss_scale

    layout = init_layout(rank, 1, 1)
    cfg = tiny_model()
    module = build_stage(cfg, all_techniques(), layout, seed=0)
    module.hcma.refresh(module.embedding.weight.detach(), 0, cfg.vocab_size)
    set_aux_loss_scale(1.0)
    batch = fixed_batches(1, cfg.vocab_size)[0]
    for _ in range(2):  # a second forward gives SCA's field term statistics to pull toward
        module.zero_grad()
        module(batch).backward()
    base = {n for n, _ in build_stage(cfg, TechniquesConfig(), layout, seed=0).named_parameters()}
    return {
        n: (p.grad is not None, float(p.grad.abs().sum()) if p.grad is not None else 0.0)
        for n, p in module.named_parameters()
        if n not in base
    }, {n: float(p.grad.abs().sum()) for n, p in module.named_parameters() if n == "embedding.weight"}


@pytest.mark.distributed
def test_gradients_reach_every_new_parameter_at_init():
    new, _ = run_distributed(_grads_at_init, 1)[0]
    assert new, "no technique parameters found"
    unreached = [n for n, (has, _) in new.items() if not has]
    assert not unreached, f"no gradient path to {unreached}"
    # the zero-initialised output maps learn from step 0 (docs/techniques.md, identity at init), as does SCA's head
    for suffix in (".lcm.alpha", ".scr.up.weight", ".reweave.out.weight", ".sca.proj.weight"):
        hits = [v for n, (_, v) in new.items() if n.endswith(suffix)]
        assert hits and all(v > 0 for v in hits), f"{suffix}: zero gradient at init"


STEPS = 3


@pytest.fixture(scope="module")
def all_on_reference():
    cfg, tech = tiny_model(), all_techniques()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    return cfg, tech, steps, run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_all_techniques_match_single_process(all_on_reference, tp, pp):
    cfg, tech, steps, ref = all_on_reference
    traces = run_distributed(layout_trace, tp * pp, cfg, tech, steps, STEPS, tp, pp, [1, 2], timeout=600)
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"all techniques tp{tp} pp{pp} zero{zero}")


@pytest.mark.distributed
def test_techniques_match_single_process_under_data_parallel_zero(all_on_reference):
    """DP2 at every ZeRO stage, ZeRO-3's zero.Init included (it partitions a child's parameters as
    soon as the child is built, so the techniques' own initialisation has to gather them first).
    SCA is off here: its EMA field statistics are per data-parallel rank between buffer syncs, by
    design (docs/techniques.md, SCA), so they cannot equal one process's statistics of the whole batch."""
    cfg, tech, steps, _ = all_on_reference
    tech = dataclasses.replace(tech, sca=dataclasses.replace(tech.sca, enabled=False))
    ref = run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]
    traces = run_distributed(layout_trace, 2, cfg, tech, steps, STEPS, 1, 1, [0, 1, 2, 3], timeout=600)
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"techniques (SCA off) dp2 zero{zero}")
