import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from loom.techniques.config import HCMAConfig, HCMAOfflineConfig
from loom.techniques.hcma import HCMA
from tests.harness import run_distributed
from tests.techniques import reference_sketches as ref

V, D = 101, 48
SKETCH_SIZES = dict(K1=8, K2=32, proj_dim=64, knn=8)  # the sketch constructor's defaults


def _table(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed))


def _cfg(**overrides) -> HCMAConfig:
    return HCMAConfig(**{**SKETCH_SIZES, **overrides})


def _moved(table: torch.Tensor) -> torch.Tensor:
    """The table a few optimizer steps after the refresh."""
    return table + 0.1 * torch.randn(table.shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("chunk_rows", [13, 4096])
def test_matches_sketch(chunk_rows):
    table = _table()
    emb = nn.Embedding(V, D)
    with torch.no_grad():
        emb.weight.copy_(table)
    sketch = ref.HCMA(emb)
    sketch.refresh()
    hcma = HCMA(_cfg(chunk_rows=chunk_rows), D)
    hcma.refresh(table, vocab_start=0, num_real_rows_local=V)
    state = hcma.state_dict()
    assert torch.equal(state["assign_coarse"], sketch.assign[0]) and torch.equal(state["assign_fine"], sketch.assign[1])
    assert torch.allclose(state["pi"], sketch.pi, atol=1e-6)
    assert torch.allclose(state["centroids_coarse"], sketch.cent[0], atol=1e-6)
    assert torch.allclose(state["centroids_fine"], sketch.cent[1], atol=1e-6)

    with torch.no_grad():
        emb.weight.copy_(_moved(table))
    expected = sketch.loss()
    expected.backward()
    weight = _moved(table).requires_grad_()
    loss = hcma.loss(weight)
    loss.backward()
    assert torch.isclose(loss, expected, atol=1e-6)
    assert weight.grad.abs().sum() > 0
    assert torch.allclose(weight.grad, emb.weight.grad, atol=1e-7, rtol=1e-4)
    m = hcma.metrics()
    assert torch.isclose(m["l_coarse"] + m["l_fine"] + m["l_anchor"], loss)
    assert m["fine_size_min"] >= 1 and m["coarse_size_max"] <= V and 0 <= m["frac_low_density"] <= 1
    assert torch.isclose(hcma.weighted_loss(weight), 1e-3 * loss)


def test_anchor_term_is_zero_right_after_refresh():
    table = _table()
    hcma = HCMA(_cfg(), D)
    hcma.refresh(table, 0, V)
    hcma.loss(table)
    assert hcma.metrics()["l_anchor"] == 0
    hcma_bf16 = HCMA(_cfg(anchor_dtype="bfloat16"), D)
    hcma_bf16.refresh(table, 0, V)
    assert hcma_bf16.state_dict()["anchor"].dtype == torch.bfloat16
    assert torch.isclose(hcma_bf16.loss(table), hcma.loss(table), rtol=1e-3)


def test_padding_rows_are_excluded():
    table = _table()
    padded = torch.cat([table, 100 * torch.randn(3, D)])
    a, b = HCMA(_cfg(), D), HCMA(_cfg(), D)
    a.refresh(table, 0, V)
    b.refresh(padded, 0, V)
    weight = padded.clone().requires_grad_()
    loss = b.loss(weight)
    loss.backward()
    assert torch.isclose(loss, a.loss(table), atol=1e-7)
    assert torch.all(weight.grad[V:] == 0)


def test_offline_step_follows_the_spec_per_row_gradient_step():
    """docs/techniques.md, HCMA offline mode, written out here: from the refresh, T steps
    Ê ← Ê − η ∇_Ê L_HCMA(Ê) with centroids, assignments, π and anchor fixed, ∇ the per-row gradient (the
    gradient of row v's own summand: V times the gradient of the mean), then E_v ← ‖E_v‖ Ê_v / ‖Ê_v‖."""
    eta, iters, w, lambda_a = 0.07, 3, [0.3, 0.7], 0.5  # not the defaults, so a swapped knob shows
    table = _moved(_table())  # a few steps after the refresh: the anchor term is not zero
    padded = torch.cat([table, torch.randn(3, D)])
    hcma = HCMA(_cfg(w=w, lambda_anchor=lambda_a, offline=HCMAOfflineConfig(eta=eta, iters=iters)), D)
    hcma.refresh(_table(), 0, V)
    new = hcma.offline_align(padded)
    assert torch.equal(new[V:], padded[V:]), "padding rows must not move"

    state = hcma.state_dict()
    pi = state["pi"][:, None]
    mu_coarse = state["centroids_coarse"][state["assign_coarse"]]
    mu_fine = state["centroids_fine"][state["assign_fine"]]
    anchor = state["anchor"]

    def per_row_gradient(E_hat):
        return 2 * w[0] * pi * (E_hat - mu_coarse) + 2 * w[1] * pi * (E_hat - mu_fine) + 2 * lambda_a * (E_hat - anchor)

    E_hat = table / table.norm(dim=-1, keepdim=True)
    first_gradient = per_row_gradient(E_hat)
    for _ in range(iters):
        E_hat = E_hat - eta * per_row_gradient(E_hat)
    expected = table.norm(dim=-1, keepdim=True) * E_hat / E_hat.norm(dim=-1, keepdim=True)
    assert torch.allclose(new[:V], expected, atol=1e-6)
    assert torch.allclose(new.norm(dim=-1), padded.norm(dim=-1), rtol=1e-5)

    # the per-row gradient is V times the gradient of L_HCMA as a mean over rows
    E = F.normalize(table, dim=-1).requires_grad_()
    loss = w[0] * (pi[:, 0] * (E - mu_coarse).pow(2).sum(-1)).mean()
    loss = loss + w[1] * (pi[:, 0] * (E - mu_fine).pow(2).sum(-1)).mean()
    loss = loss + lambda_a * (E - anchor).pow(2).sum(-1).mean()
    (grad_of_mean,) = torch.autograd.grad(loss, E)
    assert torch.allclose(V * grad_of_mean, first_gradient, atol=1e-6)

    longer = HCMA(_cfg(), D)  # default 10 iterations
    longer.load_state_dict(state)
    assert longer.loss(longer.offline_align(table)) < longer.loss(table)


def test_state_dict_round_trip():
    hcma = HCMA(_cfg(), D)
    assert hcma.state_dict() == {} and not hcma.ready
    with pytest.raises(RuntimeError, match="refresh"):
        hcma.loss(_table())
    hcma.refresh(_table(), 0, V)
    restored = HCMA(_cfg(), D)
    restored.load_state_dict(hcma.state_dict())
    assert restored.ready and torch.equal(restored.loss(_moved(_table())), hcma.loss(_moved(_table())))
    assert hcma.due(0) and hcma.due(500) and not hcma.due(1)


ROWS_PER_RANK = 52  # 101 real rows padded to 104 for TP=2: rank 1 holds 49 real rows and 3 pad rows


def _tp_worker(rank, world_size, table):
    padded = torch.cat([table, torch.zeros(world_size * ROWS_PER_RANK - V, D)])
    local = padded[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK].clone()
    real = min(ROWS_PER_RANK, V - rank * ROWS_PER_RANK)
    hcma = HCMA(_cfg(chunk_rows=16), D)
    hcma.refresh(local, rank * ROWS_PER_RANK, real, tp_group=dist.group.WORLD)
    weight = _moved(padded)[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK].clone().requires_grad_()
    loss = hcma.loss(weight)
    loss.backward()
    state = hcma.state_dict()
    return loss.detach(), weight.grad, state["assign_fine"], state["pi"], state["centroids_fine"]


@pytest.mark.distributed
def test_tp_sharded_loss_sums_to_single_rank_loss():
    table = _table()
    results = run_distributed(_tp_worker, 2, table)
    single = HCMA(_cfg(), D)
    single.refresh(table, 0, V)
    weight = _moved(table).requires_grad_()
    loss = single.loss(weight)
    loss.backward()
    state = single.state_dict()
    assert torch.isclose(results[0][0] + results[1][0], loss, atol=1e-6)
    grads = torch.cat([results[0][1], results[1][1]])
    assert torch.allclose(grads[:V], weight.grad, atol=1e-7, rtol=1e-4)
    assert torch.all(grads[V:] == 0)
    assert torch.equal(torch.cat([results[0][2], results[1][2]]), state["assign_fine"])
    assert torch.allclose(torch.cat([results[0][3], results[1][3]]), state["pi"], atol=1e-6)
    assert torch.allclose(results[1][4], state["centroids_fine"], atol=1e-6)
