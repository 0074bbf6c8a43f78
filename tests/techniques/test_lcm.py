import copy

import pytest
import torch

from loom.techniques.aux_loss import set_aux_loss_scale
from loom.techniques.config import LCMConfig
from loom.techniques.lcm import LCM, causal_anchor, lag_taps
from tests.techniques import reference_sketches as ref


def _trained(lcm: LCM, seed: int = 1) -> LCM:
    """Non-trivial parameters so that the output differs from the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lcm.alpha.copy_(torch.rand(lcm.alpha.shape, generator=g))
        if lcm.use_gate:
            lcm.gate_weight.copy_(torch.randn(lcm.gate_weight.shape, generator=g) * 0.3)
            lcm.gate_bias.fill_(0.2)
            lcm.norm.weight.copy_(1 + 0.1 * torch.randn(lcm.norm.weight.shape, generator=g))
    return lcm


def _sketch_like(lcm: LCM, cfg: LCMConfig) -> ref.LCM:
    sketch = ref.LCM(lcm.alpha.numel(), K=cfg.K, beta=cfg.beta, a_max=cfg.a_max)
    with torch.no_grad():
        sketch.alpha.copy_(lcm.alpha)
        sketch.gate_w.copy_(lcm.gate_weight)
        sketch.gate_b.copy_(lcm.gate_bias)
        sketch.norm.w.copy_(lcm.norm.weight)
    return sketch


@pytest.mark.parametrize("K, beta", [(16, 0.8), (3, 0.5), (1, 0.8), (40, 0.95)])
def test_anchor_matches_sketch(batch, K, beta):
    taps = lag_taps(K, beta)
    expected = ref.causal_anchor(batch.h, batch.pos, taps)
    for block in (5, 64, 1000):
        assert torch.allclose(causal_anchor(batch.h, batch.pos, taps, block), expected, atol=1e-6)
    short = slice(0, 7)  # a sequence shorter than K: one block, no previous rows
    assert torch.allclose(
        causal_anchor(batch.h[short], batch.pos[short], taps),
        ref.causal_anchor(batch.h[short], batch.pos[short], taps),
        atol=1e-6,
    )


def test_forward_matches_sketch(batch):
    cfg = LCMConfig(K=8, beta=0.7)
    lcm = _trained(LCM(batch.h.shape[-1], cfg))
    assert torch.allclose(lcm(batch.h, batch.pos), _sketch_like(lcm, cfg)(batch.h, batch.pos), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init(batch, dtype):
    lcm = LCM(batch.h.shape[-1], LCMConfig(n_iter=3)).to(dtype)
    h = batch.h.to(dtype)
    out = lcm(h, batch.pos)
    assert out.dtype == dtype and torch.equal(out, h)


def test_alpha_gets_gradient_at_init(batch):
    lcm = LCM(batch.h.shape[-1], LCMConfig())
    h = batch.h.clone().requires_grad_()
    lcm(h, batch.pos).pow(2).sum().backward()
    assert lcm.alpha.grad.abs().sum() > 0
    assert lcm.gate_weight.grad.abs().sum() == 0  # starts learning once a != 0 (docs/techniques.md, LCM)


def test_causal_and_no_leak_across_documents(batch):
    lcm = _trained(LCM(batch.h.shape[-1], LCMConfig(K=16)))
    with torch.no_grad():
        y0 = lcm(batch.h, batch.pos)
        future = batch.h.clone()
        future[60:] += 1.0
        assert torch.equal(lcm(future, batch.pos)[:60], y0[:60])
        other_doc = batch.h.clone()
        other_doc[:70, 0] += 5.0  # sample 0: first document only
        assert torch.equal(lcm(other_doc, batch.pos)[70:, 0], y0[70:, 0])
        assert not torch.allclose(y0[71:, 0], batch.h[71:, 0])  # the module is active


def test_bf16_forward(batch):
    lcm = _trained(LCM(batch.h.shape[-1], LCMConfig()))
    out = copy.deepcopy(lcm).bfloat16()(batch.h.bfloat16(), batch.pos)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), lcm(batch.h, batch.pos), atol=0.1)


def test_n_iter_equals_repeated_euler_steps(batch):
    lcm = _trained(LCM(batch.h.shape[-1], LCMConfig(n_iter=3, gate=False)))
    with torch.no_grad():
        a = lcm.strength()
        anchor = causal_anchor(batch.h, batch.pos, lag_taps(16, 0.8))
        x = batch.h.clone()
        for _ in range(3):
            x = x - a * (x - anchor)
        assert torch.allclose(lcm(batch.h, batch.pos), x, atol=1e-5)


def test_no_gate_and_no_clamp(batch):
    lcm = LCM(batch.h.shape[-1], LCMConfig(gate=False, clamp=False))
    assert not hasattr(lcm, "gate_weight")
    with torch.no_grad():
        lcm.alpha.fill_(-0.4)
        a = lcm.strength()
        assert (a < 0).all()
        anchor = causal_anchor(batch.h, batch.pos, lag_taps(16, 0.8))
        assert torch.allclose(lcm(batch.h, batch.pos), batch.h - a * (batch.h - anchor), atol=1e-6)
        assert lcm.metrics()["frac_alpha_negative"] == 1.0
    clamped = LCM(batch.h.shape[-1], LCMConfig(gate=False))
    with torch.no_grad():
        clamped.alpha.fill_(-0.4)
        assert torch.equal(clamped(batch.h, batch.pos), batch.h)


def test_smoothness_loss_is_attached(batch):
    mu = 0.3
    lcm = _trained(LCM(batch.h.shape[-1], LCMConfig(aux_smooth_weight=mu)))
    plain = _trained(LCM(batch.h.shape[-1], LCMConfig()))
    set_aux_loss_scale(0.5)
    try:
        h1 = batch.h.clone().requires_grad_()
        out = lcm(h1, batch.pos)
        out.sum().backward()
        h2 = batch.h.clone().requires_grad_()
        anchor = causal_anchor(h2, batch.pos, lag_taps(16, 0.8))
        smooth = (h2 - anchor).pow(2).sum(-1).mean()
        (plain(h2, batch.pos).sum() + 0.5 * mu * smooth).backward()
    finally:
        set_aux_loss_scale(1.0)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    assert torch.allclose(lcm.alpha.grad, plain.alpha.grad, atol=1e-5)
    assert torch.isclose(lcm.metrics()["smooth_loss"], smooth.detach())


def test_metrics(batch):
    lcm = LCM(batch.h.shape[-1], LCMConfig())
    lcm(batch.h, batch.pos)
    m = lcm.metrics()
    assert m["gate_mean"] == 0.5 and m["strength_mean"] == 0.0 and m["frac_alpha_negative"] == 0.0
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in m.values())
