import copy

import pytest
import torch

from loom.techniques.aux_loss import set_aux_loss_scale
from loom.techniques.cmr import LayerCapture, Reweave
from tests.techniques import reference_sketches as ref

D, R, SLOTS = 64, 16, 3


def _captures(seed: int = 0):
    torch.manual_seed(seed)
    return [LayerCapture(D, R) for _ in range(SLOTS)]


def _trained(module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("out.weight", "gate.weight", "slot_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _bank(h, captures):
    return torch.stack([c(h) for c in captures], dim=2)


def _with_slot(bank, slot: int, captured):
    """A copy of `bank` [s, b, n, r] with `slot` replaced by `captured` [s, b, r]."""
    return torch.cat([bank[:, :, :slot], captured[:, :, None].to(bank.dtype), bank[:, :, slot + 1 :]], dim=2)


def test_capture_and_reweave_match_sketch(batch):
    captures = [_trained(c, i) for i, c in enumerate(_captures())]
    reweave = _trained(Reweave(D, R, SLOTS))
    sketch_caps = [ref.LayerCapture(D, R) for _ in range(SLOTS)]
    sketch_rw = ref.Reweave(D, R, SLOTS)
    with torch.no_grad():
        for ours, theirs in zip(captures, sketch_caps):
            theirs.norm.w.copy_(ours.norm.weight)
            theirs.proj.weight.copy_(ours.proj.weight)
            theirs.gate.weight.copy_(ours.gate.weight)
            theirs.gate.bias.copy_(ours.gate.bias)
        sketch_rw.norm.w.copy_(reweave.norm.weight)
        sketch_rw.q.weight.copy_(reweave.query.weight)
        sketch_rw.layer_bias.copy_(reweave.slot_bias)
        sketch_rw.out.weight.copy_(reweave.out.weight)
        bank, sketch_bank = _bank(batch.h, captures), _bank(batch.h, sketch_caps)
        assert torch.allclose(bank, sketch_bank, atol=1e-6)
        assert torch.allclose(reweave(batch.h, bank), sketch_rw(batch.h, sketch_bank), atol=1e-5)
        # Unavailable slots are exactly as if the bank only had the available ones.
        sketch_two = ref.Reweave(D, R, 2)
        sketch_two.load_state_dict({**sketch_rw.state_dict(), "layer_bias": sketch_rw.layer_bias[[0, 2]]})
        masked = reweave(batch.h, _with_slot(bank, 1, torch.full_like(bank[:, :, 1], 7.0)), [0, 2])
        assert torch.allclose(masked, sketch_two(batch.h, sketch_bank[:, :, [0, 2]]), atol=1e-5)
        as_mask = reweave(batch.h, bank, torch.tensor([True, False, True]))
        assert torch.allclose(as_mask, reweave(batch.h, bank, [0, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init(batch, dtype):
    captures = [c.to(dtype) for c in _captures()]
    reweave = Reweave(D, R, SLOTS, rec_loss_weight=0.1).to(dtype)
    h = batch.h.to(dtype)
    bank = _bank(h, captures)
    assert bank.dtype == dtype
    out = reweave(h, bank, [0, 1])
    assert out.dtype == dtype and torch.equal(out, h)


def test_out_gets_gradient_at_init(batch):
    captures, reweave = _captures(), Reweave(D, R, SLOTS)
    h = batch.h.clone().requires_grad_()
    reweave(h, _bank(h, captures)).pow(2).sum().backward()
    assert reweave.out.weight.grad.abs().sum() > 0
    assert reweave.query.weight.grad.abs().sum() == 0


def test_per_token(batch):
    captures = [_trained(c, i) for i, c in enumerate(_captures())]
    reweave = _trained(Reweave(D, R, SLOTS))
    with torch.no_grad():
        y0 = reweave(batch.h, _bank(batch.h, captures))
        h2 = batch.h.clone()
        h2[40, 1] += 3.0
        y1 = reweave(h2, _bank(h2, captures))
        changed = (y1 != y0).any(-1)
        assert changed[40, 1] and changed.sum() == 1


def test_reconstruction_loss_is_attached(batch):
    weight = 0.7
    captures = [_trained(c, i) for i, c in enumerate(_captures())]
    reweave = Reweave(D, R, SLOTS, rec_loss_weight=weight)
    bank = _bank(batch.h, captures).detach()
    set_aux_loss_scale(2.0)
    try:
        reweave(batch.h, bank, [0, 1]).sum().backward()
    finally:
        set_aux_loss_scale(1.0)
    probe = copy.deepcopy(reweave)
    probe.zero_grad()
    with torch.no_grad():
        q = probe.query(torch.nn.functional.rms_norm(batch.h, (D,), probe.norm.weight, 1e-6))
        logits = torch.einsum("sbr,sbnr->sbn", q, bank) * R**-0.5 + probe.slot_bias
        logits[..., 2] = float("-inf")
        rebuilt = torch.einsum("sbn,sbnr->sbr", logits.softmax(-1), bank)
    decoded = torch.einsum("sbr,nqr->sbnq", rebuilt, probe.rec_maps)
    rec = (decoded - bank).pow(2).sum(-1)[..., :2].sum(-1).mean()
    (2.0 * weight * rec).backward()
    assert torch.isclose(reweave.metrics()["rec_loss"], rec.detach())
    assert torch.allclose(reweave.rec_maps.grad, probe.rec_maps.grad, atol=1e-5)
    assert reweave.rec_maps.grad[2].abs().sum() == 0


def test_metrics(batch):
    captures, reweave = _captures(), Reweave(D, R, SLOTS)
    reweave(batch.h, _bank(batch.h, captures), [0, 1])
    assert captures[0].metrics()["gate_mean"] == 0.5
    m = reweave.metrics()
    assert m["attn_weight_slot2"] == 0 and torch.isclose(
        m["attn_weight_slot0"] + m["attn_weight_slot1"], torch.tensor(1.0)
    )
    assert 0 < m["attn_entropy"] <= torch.log(torch.tensor(2.0)) + 1e-6
