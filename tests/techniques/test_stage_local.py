"""Stage-local CMR (docs/techniques.md, CMR → Pipeline parallelism): a target reads only the sources its own
pipeline stage captures. A stage's input state h^first is the previous stage's output, captured (if it is a
source) over there, so it is not readable; a target left with no readable source is skipped (the identity),
and the config reports it as a warning.

The in-model test trains at PP 2 and 4 and compares with one process whose targets are masked as that
layout masks them; the mask is written out here, not taken from the code under test."""

import pytest
import torch

from loom.model.config import ModelConfig
from loom.model.technique_plan import TechniquePlan
from loom.techniques.cmr import LayerCapture, Reweave
from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import assert_traces_match, fixed_batches, layout_trace, reference_trace, tiny_model


def _cmr(stage_local: bool = True, **knobs) -> TechniquesConfig:
    tech = TechniquesConfig()
    tech.cmr.enabled, tech.cmr.stage_local = True, stage_local
    for key, value in knobs.items():
        setattr(tech.cmr, key, value)
    return tech


def _readable(tech: TechniquesConfig, num_layers: int, pp: int) -> dict[int, list[int]]:
    """{target: bank slots} as the model at pipeline size `pp` reads them (the stage's input is h^first)."""
    plan = TechniquePlan.from_config(tech, num_layers)
    per_stage = num_layers // pp
    return {t: plan.slots_before(t, (t - 1) // per_stage * per_stage) for t in plan.cmr_targets}


def test_a_stage_reads_only_what_it_captures():
    tech = _cmr()  # L = 8: sources h^0, h^2, h^4, h^5 (slots 0-3), targets h^6, h^8
    # PP 2: the second stage (blocks 4..7) gets h^4 from the first stage; it captures h^5 only
    assert _readable(tech, 8, 2) == {6: [3], 8: [3]}
    # PP 4: blocks 6..7 capture no source, so h^8 reads nothing (it used to crash in the softmax mask)
    assert _readable(tech, 8, 4) == {6: [3], 8: []}
    # the first stage's input is the embedding output, which that stage captures itself
    assert _readable(_cmr(target_layers=[2, 8]), 8, 2) == {2: [0], 8: [3]}
    # the defaults at L = 32, PP = 4: sources h^0, h^8, h^16, h^20; h^24 reads h^20, h^32 reads nothing
    assert _readable(tech, 32, 4) == {24: [3], 32: []}
    assert tech.cmr.available_slots(32, 32, pipeline=4) == [] and tech.cmr.available_slots(24, 32, 4) == [3]
    assert _cmr(stage_local=False).cmr.available_slots(32, 32, pipeline=4) == [0, 1, 2, 3]


def test_a_target_without_a_source_is_a_warning_not_a_crash(tmp_path):
    from loom.launch.config import load_config
    from tests.logs import captured_lines

    tech = _cmr()
    assert tech.warnings(8, 2) == [] and tech.validate(8) == []
    (warning,) = tech.warnings(8, 4)
    assert warning.startswith("cmr: stage_local: target h^8 reads no source at pipeline 4")
    assert _cmr(stage_local=False).warnings(8, 4) == []
    assert len(tech.warnings(32, 4)) == 1 and "h^32" in tech.warnings(32, 4)[0]

    overrides = [
        "model.num_layers=8",
        "parallel.pipeline=4",
        "techniques.cmr.enabled=true",
        "techniques.cmr.stage_local=true",
        f"output_dir={tmp_path}",
    ]
    with captured_lines() as lines:
        load_config(None, overrides, world_size=4, check_files=False)
    assert any(line.startswith("warning: techniques.cmr: stage_local: target h^8") for line in lines), lines


def test_reweave_with_no_readable_slot_is_the_identity():
    torch.manual_seed(0)
    h = torch.randn(6, 2, 32)
    reweave = Reweave(32, 8, 3)
    with torch.no_grad():
        reweave.out.weight.normal_()
    bank = torch.stack([LayerCapture(32, 8)(h) for _ in range(3)], dim=2)
    assert torch.equal(reweave(h, bank, []), h)
    assert torch.equal(reweave(h, bank, torch.zeros(3, dtype=torch.bool)), h)
    assert not torch.equal(reweave(h, bank, [1]), h)
    with pytest.raises(ValueError, match="subset"):
        reweave(h, bank, [3])


def test_the_model_never_reads_a_slot_it_did_not_capture():
    """A readable slot that holds no capture is a wiring error, not a zero vector in the softmax."""
    from loom.model.context import ForwardContext

    plan = TechniquePlan.from_config(_cmr(stage_local=False), 8)
    ctx = ForwardContext(*[None] * 6, plan=plan, bank=[torch.zeros(1), None, None, None])
    assert ctx.readable_slots(2) == [0]
    with pytest.raises(RuntimeError, match="hold no captured state"):
        ctx.readable_slots(6)


def test_exported_remote_code_skips_a_target_without_a_readable_source():
    pytest.importorskip("transformers")
    from loom.launch.convert.hf_modeling.configuration_loom import LoomConfig
    from loom.launch.convert.hf_modeling.modeling_loom import LoomForCausalLM

    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))

    def logits(readable_by_h4: list, h4_out_scale: float, reset_bank_at=(2,)) -> torch.Tensor:
        cmr = {"sources": [0, 2], "targets": [2, 4], "rank": 8, "reset_bank_at": list(reset_bank_at)}
        cmr["readable"] = {"2": [0], "4": readable_by_h4}
        config = LoomConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            techniques={"cmr": cmr},
        )
        torch.manual_seed(0)
        model = LoomForCausalLM(config).eval()
        with torch.no_grad():
            model.layers[1].reweave.out.weight.normal_()  # h^2: reads the embedding output
            model.layers[3].reweave.out.weight.normal_(std=h4_out_scale)
            return model(tokens).logits

    # at PP 2 the stage of h^4 (blocks 2..3) captures no source: its reweave is skipped, whatever its W_u
    skipped = logits([], 1.0)
    assert torch.isfinite(skipped).all()
    assert torch.equal(skipped, logits([], 5.0))
    assert not torch.equal(skipped, logits([0, 1], 1.0, reset_bank_at=()))  # not stage-local: h^4 reads both


# --------------------------------------------------------------------------- in the model, at PP 2 and 4
STEPS = 3
LAYERS = 8


def _stage_local_tech() -> TechniquesConfig:
    """Sources at every stage boundary of PP 2 and PP 4 (h^2, h^4, h^6), targets on every stage of PP 4; at
    PP 2 target h^6 may read h^5 but not h^4, at PP 4 h^4 reads h^3 only and h^8 reads nothing."""
    return _cmr(source_layers=[1, 2, 3, 4, 5, 6], target_layers=[2, 4, 6, 8], rank=8)


def _reference_with_layout_mask(rank, world_size, cfg, tech, steps, num_steps, pp):
    """One process whose CMR targets read what the PP-`pp` layout's stages capture; the rule is written
    out here: the stage that produces h^point has blocks first..first+per_stage-1 and captures their
    outputs h^(first+1).., plus h^0 when it is the first stage."""
    from loom.model.context import ForwardContext

    sources = tech.cmr.sources(cfg.num_layers)
    per_stage = cfg.num_layers // pp

    def readable_slots(self, point):
        first = (point - 1) // per_stage * per_stage
        captured_here = set(range(first + 1, point)) | ({0} if first == 0 else set())
        return [slot for slot, src in enumerate(sources) if src in captured_here]

    ForwardContext.readable_slots = readable_slots  # in this forked process only
    _every_parameter_gets_a_gradient()
    return reference_trace(rank, world_size, cfg, tech, steps, num_steps)


def _every_parameter_gets_a_gradient() -> None:
    """A skipped target's reweave, and a source no target of its stage reads, take no part in the loss.
    DeepSpeed still gives them a zero gradient (and AdamW's weight decay), where plain PyTorch leaves
    `.grad` None and skips them; adding 0 x every parameter to the reference's loss does what DeepSpeed does."""
    from loom.model.parallel import parallelize

    build_stage = parallelize.build_stage

    def build_touching_every_parameter(*args, **kwargs):
        module = build_stage(*args, **kwargs)
        forward = module.forward

        def forward_with_zero_terms(*f_args, **f_kwargs):
            loss = forward(*f_args, **f_kwargs)
            return loss + sum(0.0 * p.sum() for p in module.parameters())

        module.forward = forward_with_zero_terms
        return module

    parallelize.build_stage = build_touching_every_parameter


@pytest.mark.distributed
@pytest.mark.parametrize("pp", [2, 4])
def test_stage_local_pipeline_matches_one_process_with_the_same_mask(pp):
    cfg: ModelConfig = tiny_model(num_layers=LAYERS)
    tech = _stage_local_tech()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(_reference_with_layout_mask, 1, cfg, tech, steps, STEPS, pp)[0]
    # the mask matters: the reweave's W_u learns a different gradient with every source readable
    unmasked = run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]
    assert not torch.equal(
        unmasked.grads[0]["layers.5.reweave.out.weight"], ref.grads[0]["layers.5.reweave.out.weight"]
    )
    traces = run_distributed(layout_trace, pp, cfg, tech, steps, STEPS, 1, pp, [1], timeout=600)
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"stage-local CMR pp{pp} zero{zero}")


@pytest.mark.distributed
def test_stage_local_masks_follow_the_chunks_of_an_interleaved_pipeline():
    """PP 2 × 2 model chunks per rank has the four virtual stages of PP 4, so each target reads what its
    own chunk captures: PP 4's mask (`GPTStage.forward` gives each chunk its own first point)."""
    cfg: ModelConfig = tiny_model(num_layers=LAYERS)
    tech = _stage_local_tech()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(_reference_with_layout_mask, 1, cfg, tech, steps, STEPS, 4)[0]
    traces = run_distributed(
        layout_trace, 2, cfg, tech, steps, STEPS, 1, 2, [1], parallel_overrides={"virtual_stages": 2}, timeout=600
    )
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"stage-local CMR pp2 vp2 zero{zero}")
