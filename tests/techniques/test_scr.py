import copy

import pytest
import torch

from loom.techniques.config import SCRConfig
from loom.techniques.scr import SCR, segmented_cumsum
from tests.techniques import reference_sketches as ref


def _loop_scan(x, start, decay):
    y = x.clone()
    for t in range(1, x.shape[0]):
        y[t] = x[t] + decay * (~start[t]).to(x.dtype)[:, None] * y[t - 1]
    return y


def _trained(scr: SCR, seed: int = 1) -> SCR:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scr.up.weight.copy_(torch.randn(scr.up.weight.shape, generator=g) * 0.1)
        scr.relevance.weight.copy_(torch.randn(scr.relevance.weight.shape, generator=g) * 0.2)
        scr.relevance.bias.fill_(0.3)
    return scr


def _sketch_like(scr: SCR) -> ref.SCR:
    sketch = ref.SCR(scr.up.weight.shape[0], r=scr.rank, gamma=scr.gamma)
    with torch.no_grad():
        sketch.norm.w.copy_(scr.norm.weight)
        sketch.rel.weight.copy_(scr.relevance.weight)
        sketch.rel.bias.copy_(scr.relevance.bias)
        sketch.down.weight.copy_(scr.down.weight)
        sketch.up.weight.copy_(scr.up.weight)
    return sketch


@pytest.mark.parametrize("decay", [1.0, 0.9, 0.3, 0.0])
@pytest.mark.parametrize("block", [2, 7, 64, 4096])
def test_segmented_cumsum_matches_loop(decay, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, 5, generator=g, dtype=torch.float64)
    start = torch.rand(300, 3, generator=g) < 0.03
    start[0] = True
    assert torch.allclose(segmented_cumsum(x, start, decay, block), _loop_scan(x, start, decay), atol=1e-10)


def test_segmented_cumsum_matches_sketch_and_is_precise_late_in_long_sequences():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, 1, 3, generator=g) + 0.5
    start = torch.zeros(20000, 1, dtype=torch.bool)
    start[0] = start[-50] = True
    exact = _loop_scan(x.double(), start, 1.0)
    ours = segmented_cumsum(x, start)
    assert torch.allclose(ours, ref.segmented_cumsum(x, start), rtol=1e-2)
    assert ((ours - exact).abs() / exact).max() < 1e-5  # the single-level sketch loses ~1e-3 here


def test_forward_matches_sketch_with_depth_recursion(batch):
    d = batch.h.shape[-1]
    first, second = _trained(SCR(d, SCRConfig(rank=16)), 1), _trained(SCR(d, SCRConfig(rank=16)), 2)
    s1, s2 = _sketch_like(first), _sketch_like(second)
    y1, rho1 = first(batch.h, batch.start)
    r1, rr1 = s1(batch.h, batch.start)
    y2, rho2 = second(y1, batch.start, rho1)
    r2, rr2 = s2(r1, batch.start, rr1)
    assert torch.allclose(y1, r1, atol=1e-5) and torch.allclose(rho1, rr1, atol=1e-6)
    assert torch.allclose(y2, r2, atol=1e-5) and torch.allclose(rho2, rr2, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init(batch, dtype):
    scr = SCR(batch.h.shape[-1], SCRConfig(rank=16, decay=0.9)).to(dtype)
    h = batch.h.to(dtype)
    out, rho = scr(h, batch.start)
    assert out.dtype == dtype and torch.equal(out, h)
    assert rho.dtype == torch.float32 and torch.all(rho == 0.5)


def test_up_gets_gradient_at_init(batch):
    scr = SCR(batch.h.shape[-1], SCRConfig(rank=16))
    _, rho = scr(batch.h, batch.start)
    out, _ = scr(batch.h.clone().requires_grad_(), batch.start, rho)
    out.pow(2).sum().backward()
    assert scr.up.weight.grad.abs().sum() > 0
    assert scr.down.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_causal_and_no_leak_across_documents(batch, decay):
    scr = _trained(SCR(batch.h.shape[-1], SCRConfig(rank=16, decay=decay)))
    with torch.no_grad():
        y0, _ = scr(batch.h, batch.start)
        future = batch.h.clone()
        future[60:] += 1.0
        assert torch.equal(scr(future, batch.start)[0][:60], y0[:60])
        other_doc = batch.h.clone()
        other_doc[:70, 0] += 5.0
        assert torch.allclose(scr(other_doc, batch.start)[0][70:, 0], y0[70:, 0], atol=1e-6, rtol=0)
        assert not torch.allclose(y0, batch.h)


def test_bf16_forward(batch):
    scr = _trained(SCR(batch.h.shape[-1], SCRConfig(rank=16)))
    out, rho = copy.deepcopy(scr).bfloat16()(batch.h.bfloat16(), batch.start)
    assert out.dtype == torch.bfloat16 and rho.dtype == torch.float32
    assert torch.allclose(out.float(), scr(batch.h, batch.start)[0], atol=0.1)


def test_gamma_zero_ignores_previous_rho(batch):
    scr = _trained(SCR(batch.h.shape[-1], SCRConfig(rank=16, gamma=0.0)))
    with torch.no_grad():
        a, rho_a = scr(batch.h, batch.start)
        b, rho_b = scr(batch.h, batch.start, torch.rand(batch.start.shape))
    assert torch.equal(a, b) and torch.equal(rho_a, rho_b)


def test_relevance_noise_only_in_training(batch):
    scr = _trained(SCR(batch.h.shape[-1], SCRConfig(rank=16, relevance_noise="concrete(0.5)")))
    clean = _trained(SCR(batch.h.shape[-1], SCRConfig(rank=16)))
    with torch.no_grad():
        scr.eval()
        assert torch.equal(scr(batch.h, batch.start)[1], clean(batch.h, batch.start)[1])
        scr.train()
        assert not torch.allclose(scr(batch.h, batch.start)[1], clean(batch.h, batch.start)[1])
    assert "relevance_mean" in scr.metrics()


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_concrete_noise_with_fixed_uniforms(batch, monkeypatch, tau):
    """Training-time relevance is the binary concrete (relaxed Bernoulli) sample
    sigmoid((logit + log u - log(1 - u)) / tau), with u clamped to [1e-6, 1 - 1e-6] in fp32; the logit is
    w . RMSNorm(h) + b, computed here independently in float64."""
    scr = _trained(SCR(batch.h.shape[-1], SCRConfig(rank=16, relevance_noise=f"concrete({tau})"))).train()
    s, b = batch.start.shape
    # every kind of draw: no noise (0.5), both tails, and the clamped ends 0 and 1
    fixed = torch.tensor([0.5, 0.1, 0.9, 0.01, 0.999, 0.0, 1.0, 0.3])
    uniforms = fixed.repeat(s * b // len(fixed) + 1)[: s * b].reshape(s, b)

    def fixed_rand_like(t, *args, **kwargs):
        assert t.shape == (s, b), "the noise is drawn once per token"
        return uniforms.to(t.dtype)

    monkeypatch.setattr(torch, "rand_like", fixed_rand_like)
    with torch.no_grad():
        _, rho = scr(batch.h, batch.start)

    h = batch.h.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * scr.norm.weight.double()
    logit = normed @ scr.relevance.weight.double()[0] + scr.relevance.bias.double()
    u = uniforms.clamp(1e-6, 1 - 1e-6).double()  # the bounds as fp32 holds them (1 - 1e-6 rounds to 0.99999899)
    expected = torch.sigmoid((logit + torch.log(u / (1 - u))) / tau)
    assert rho.dtype == torch.float32
    torch.testing.assert_close(rho.double(), expected, rtol=0, atol=2e-6)
    # u = 0.5 adds no noise, only the temperature: sigmoid(logit / tau)
    half = uniforms == 0.5
    torch.testing.assert_close(rho.double()[half], torch.sigmoid(logit / tau)[half], rtol=0, atol=2e-6)
