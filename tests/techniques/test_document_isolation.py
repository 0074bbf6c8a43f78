"""Packed documents stay apart inside the model, at TP 2 x PP 2: changing an earlier document of a packed
sample leaves every later document's logits bitwise unchanged, for each technique alone and all five.

Layouts are compared with each other elsewhere, so a wrong wiring of the document metadata (`pos`, `start`,
`doc` from `GPTStage.make_context` to the blocks) would pass those tests in every layout alike; this test
compares a model with itself on two inputs instead. Attention's output projection is zeroed, so the only
paths between positions are the techniques' own (LCM's anchor over earlier positions, SCR's prefix sums);
their parameters are moved away from the identity so those paths carry something. The second test breaks
the wiring on purpose and checks that the first one's check fails."""

import zlib

import pytest
import torch

from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import EOS, MICRO_BATCH, SEQ, all_techniques, init_layout, tiny_model

TECHNIQUES = ["lcm", "scr", "cmr", "sca", "hcma"]
FIRST_EOS = (5, 8)  # per sample: the first document is tokens 0..FIRST_EOS (EOS included)


def _variants(names) -> dict:
    full, out = all_techniques(), {}
    for name in names:
        tech = TechniquesConfig()
        setattr(tech, name, getattr(full, name))
        out[name] = tech
    out["all"] = full
    return out


def _packed_pair(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [MICRO_BATCH, SEQ + 1] batches of packed documents that differ only inside the first document."""
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(EOS + 1, vocab, (MICRO_BATCH, SEQ + 1), generator=g)
    clean[0, FIRST_EOS[0]], clean[0, 11], clean[1, FIRST_EOS[1]] = EOS, EOS, EOS  # sample 0 holds 3 documents
    perturbed = clean.clone()
    for row, eos_at in enumerate(FIRST_EOS):
        perturbed[row, :eos_at] = torch.randint(EOS + 1, vocab, (eos_at,), generator=g)
    return clean, perturbed


def _away_from_identity(module) -> None:
    """Attention mixes nothing; the techniques' parameters are moved off their identity init (the same
    values on every rank: a generator per parameter name)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if name.endswith("attention.proj.weight"):
                param.zero_()
            elif name.endswith("lcm.alpha"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=g))
            elif any(part in name for part in (".lcm.", ".scr.", "reweave.", "capture.")):
                param.add_(0.3 * torch.randn(param.shape, generator=g))


def _break_wiring(mutation: str) -> None:
    """Feed the model wrong document metadata, as a wiring mistake in make_context would."""
    from loom.model import gpt
    from loom.techniques.doc_meta import DocumentMetadata, document_metadata

    def miswired(tokens, eos_id):
        meta = document_metadata(tokens, eos_id)
        if mutation == "start shifted by one":
            start = torch.roll(meta.start, 1, dims=0)
            start[0] = True
            return DocumentMetadata(meta.pos, start, meta.doc)
        if mutation == "positions not reset":
            steps = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(meta.pos)
            return DocumentMetadata(steps.contiguous(), meta.start, meta.doc)
        raise ValueError(mutation)

    gpt.document_metadata = miswired  # in this forked process only


def _logits_of_both(rank, world_size, tp, pp, variants: dict, mutation=None):
    """{variant: (logits of the clean batch, of the perturbed batch)} on the last stage (vocab shard)."""
    from megatron.core import parallel_state as ps

    from loom.model.parallel.parallelize import build_stage
    from loom.model.parallel.pipeline import forward_only

    layout = init_layout(rank, tp, pp)
    if mutation is not None:
        _break_wiring(mutation)
    cfg = tiny_model()
    batches = _packed_pair(cfg.vocab_size)
    out = {}
    for name, tech in {"baseline": TechniquesConfig(), **variants}.items():
        module = build_stage(cfg, tech, layout, seed=0, dtype=torch.float32)
        _away_from_identity(module)
        module.eval()
        specs = module.carry_specs(MICRO_BATCH, SEQ, torch.float32)

        def forward(mb, received, module=module):
            return module(mb, received, return_logits=True)

        with torch.no_grad():
            logits = [
                forward_only(forward, [b], ps.get_pipeline_model_parallel_group(), specs, torch.device("cpu"))
                for b in batches
            ]
        out[name] = (logits[0][0], logits[1][0]) if module.is_last else None
    return out


def _leaks(results: list) -> dict:
    """{variant: (later-document positions whose logits changed, earlier-document positions that changed)}."""
    out = {}
    for rank_results in results:
        for name, pair in rank_results.items():
            if pair is None:
                continue
            clean, perturbed = pair  # [s, b, V/tp]
            later, earlier = 0, 0
            for row, eos_at in enumerate(FIRST_EOS):
                changed = (clean[:, row] != perturbed[:, row]).any(-1)  # per input position
                later += int(changed[eos_at + 1 :].sum())
                earlier += int(changed[:eos_at].sum())
            prev = out.get(name, (0, 0))
            out[name] = (prev[0] + later, prev[1] + earlier)
    return out


@pytest.mark.distributed
def test_later_documents_are_bitwise_unchanged_at_tp2_pp2():
    results = run_distributed(_logits_of_both, 4, 2, 2, _variants(TECHNIQUES))
    leaks = _leaks(results)
    assert set(leaks) == {"baseline", *TECHNIQUES, "all"}
    for name, (later, earlier) in leaks.items():
        assert earlier > 0, f"{name}: the perturbation did not reach the logits of its own document"
        assert later == 0, f"{name}: {later} logit rows of later documents changed when an earlier one did"
    # LCM and SCR do carry information between positions here, so an unmasked lag or sum would show
    for rank_results in results:
        for name in ("lcm", "scr", "all"):
            if rank_results.get(name) is not None:
                assert not torch.equal(rank_results[name][0], rank_results["baseline"][0]), name


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mutation,caught_by", [("start shifted by one", "scr"), ("positions not reset", "lcm")], ids=["start", "pos"]
)
def test_the_check_catches_miswired_document_metadata(mutation, caught_by):
    leaks = _leaks(run_distributed(_logits_of_both, 4, 2, 2, _variants([caught_by]), mutation))
    assert leaks[caught_by][0] > 0 and leaks["all"][0] > 0, f"{mutation} went unnoticed: {leaks}"
    assert leaks["baseline"][0] == 0  # the baseline mixes nothing, whatever the metadata
