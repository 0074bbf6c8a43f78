import copy

import pytest
import torch
import torch.distributed as dist

from loom.techniques.config import SCAConfig
from loom.techniques.sca import SCAHead
from tests.harness import run_distributed
from tests.techniques import reference_sketches as ref

D, V, R, W = 64, 50, 32, 16


def _pair(seed: int = 0, **overrides):
    cfg = SCAConfig(rank=R, window=W, warmup_steps=0, **overrides)
    torch.manual_seed(seed)
    ours = SCAHead(D, V, cfg)
    sketch = ref.SCAHead(D, V, r=R, W=W)
    with torch.no_grad():
        sketch.proj.weight.copy_(ours.proj.weight)
        sketch.norm.w.copy_(ours.norm.weight)
    return cfg, ours, sketch


def test_matches_sketch_over_several_micro_batches(batch):
    cfg, ours, sketch = _pair()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        tokens = torch.randint(0, V, batch.tokens.shape, generator=g)
        h1, h2 = batch.h.clone().requires_grad_(), batch.h.clone().requires_grad_()
        total = ours(h1, tokens, batch.doc, step=10)
        l_field, l_vc, l_coh = sketch(h2, tokens, batch.doc)
        expected = cfg.lambda_field * l_field + cfg.lambda_coh * l_coh + cfg.lambda_vc * l_vc
        m = ours.metrics()
        assert torch.allclose(
            torch.stack([m["l_field"], m["l_vc"], m["l_coh"]]), torch.stack([l_field, l_vc, l_coh]).detach(), atol=1e-5
        )
        assert torch.isclose(total, expected, atol=1e-6)
        total.backward()
        expected.backward()
        assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
        assert torch.allclose(ours.proj.weight.grad, sketch.proj.weight.grad, atol=1e-6)
    assert m["l_field"] > 0 and m["l_coh"] > 0
    for name in ("mu", "var", "cnt"):
        assert torch.allclose(getattr(ours, name), getattr(sketch, name), atol=1e-6)


def test_ema_update_is_exactly_the_spec_formula():
    cfg = SCAConfig(rank=4, ema_beta=0.9)
    head = SCAHead(8, 6, cfg)
    z1 = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).float()
    ids1 = torch.tensor([2, 2, 5, 2, 0])
    z2 = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1).float()
    ids2 = torch.tensor([2, 5, 5])
    mu, var, cnt = head.mu.clone().double(), head.var.clone().double(), head.cnt.clone().double()
    for z, ids in ((z1, ids1), (z2, ids2)):
        head.update_field(z, ids)
        for v in ids.unique().tolist():
            obs = z[ids == v].double()
            n, m = obs.shape[0], obs.mean(0)
            batch_var = ((obs * obs).mean(0) - m * m).clamp_min(0)
            eta = max(1 - 0.9, 1 / (cnt[v].item() + 1))
            mu[v] = mu[v] + eta * (m - mu[v])
            var[v] = var[v] + eta * (batch_var + (m - mu[v]) ** 2 - var[v])
            cnt[v] += n
    assert torch.allclose(head.mu.double(), mu, atol=1e-6)
    assert torch.allclose(head.var.double(), var, atol=1e-6)
    assert torch.equal(head.cnt.double(), cnt)
    untouched = [1, 3, 4]
    assert torch.all(head.mu[untouched] == 0) and torch.all(head.var[untouched] == 0.25)
    assert torch.allclose(head.mu[0], z1[4])  # first observation sets the field exactly


def test_field_loss_off_during_warmup(batch):
    cfg = SCAConfig(rank=R, window=W, warmup_steps=100)
    head = SCAHead(D, V, cfg)
    head(batch.h, batch.tokens, batch.doc, step=0)
    total = head(batch.h, batch.tokens, batch.doc, step=99)
    m = head.metrics()
    assert m["l_field"] > 0
    assert torch.isclose(total, cfg.lambda_coh * m["l_coh"] + cfg.lambda_vc * m["l_vc"])
    after = head(batch.h, batch.tokens, batch.doc, step=100)
    assert after > total


def test_update_ema_false_leaves_buffers(batch):
    _, head, _ = _pair()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    head(batch.h, batch.tokens, batch.doc, step=0, update_ema=False)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_buffers_persistent_and_stay_fp32(batch):
    _, head, _ = _pair()
    head(batch.h, batch.tokens, batch.doc, step=0)
    assert {"mu", "var", "cnt"} <= set(head.state_dict())
    snapshot = {k: getattr(head, k).clone() for k in ("mu", "var", "cnt")}
    cast = copy.deepcopy(head).bfloat16()
    assert cast.proj.weight.dtype == torch.bfloat16
    for name, value in snapshot.items():
        assert getattr(cast, name).dtype == torch.float32 and torch.equal(getattr(cast, name), value)
    loss = cast(batch.h.bfloat16(), batch.tokens, batch.doc, step=5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_coherence_needs_two_documents(batch):
    _, head, _ = _pair()
    one_doc = torch.ones_like(batch.doc)
    head(batch.h[:, :1], batch.tokens[:, :1], one_doc[:, :1], step=0)
    assert head.metrics()["l_coh"] == 0
    head(batch.h, batch.tokens, batch.doc, step=0)
    assert head.metrics()["l_coh"] > 0


def _sync_worker(rank, world_size):
    head = SCAHead(8, 5, SCAConfig(rank=2))
    with torch.no_grad():
        head.mu.fill_(float(rank))
        head.var.fill_(2.0 * rank)
        head.cnt.fill_(10.0 * (rank + 1))
    head.sync_buffers(dist.group.WORLD)
    return head.mu.clone(), head.var.clone(), head.cnt.clone()


@pytest.mark.distributed
def test_sync_buffers_averages_over_the_group():
    results = run_distributed(_sync_worker, 2)
    for mu, var, cnt in results:
        assert torch.all(mu == 0.5) and torch.all(var == 1.0) and torch.all(cnt == 15.0)
    head = SCAHead(8, 5, SCAConfig(rank=2))
    head.sync_buffers(None)  # no group: no-op
    assert torch.all(head.mu == 0)
