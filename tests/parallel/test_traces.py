"""The trace comparison itself: each check fires on a difference just beyond its bound and not within it."""

import copy

import pytest
import torch

from tests.parallel.traces import ADAM_SLACK, TOLERANCES, Trace, TraceMismatch, assert_traces_match


def _reference() -> Trace:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, generator=g, dtype=torch.float64) * 0.03
    grads = [{"w": torch.randn(8, 4, generator=g, dtype=torch.float64) * 1e-3} for _ in range(2)]
    reach = [{"w": torch.full((8, 4), 3e-3 / 1e-5, dtype=torch.float64)} for _ in range(2)]  # lr / eps
    return Trace(
        losses=[6.25, 6.2],
        grad_norms=[1.5, 1.4],
        grads=grads,
        weights={"w": weight, "stats": torch.ones(8, dtype=torch.float64)},
        adam_reach=reach,
    )


def _perturbed(change) -> Trace:
    got = copy.deepcopy(_reference())
    change(got)
    return got


def test_identical_traces_match_on_every_path():
    for tolerance in TOLERANCES:
        assert max(assert_traces_match(_reference(), _reference(), tolerance=tolerance).values()) == 0.0


def _changes(tolerance: str) -> list:
    """(change(trace, factor), message): factor 1 puts one element exactly on its bound."""
    tol, ref = TOLERANCES[tolerance], _reference()
    largest = max(g.abs().max().item() for g in ref.grads[0].values())
    grad_bound = tol.grad * ref.grads[0]["w"].abs().max().item() + tol.grad_floor * largest
    weight_bound = tol.weight * ref.weights["w"].abs().max().item() + tol.weight_floor
    buffer_bound = tol.buffer * ref.weights["stats"].abs().max().item() + tol.weight_floor

    def loss(t, f):
        t.losses[1] *= 1 + f * tol.loss

    def norm(t, f):
        t.grad_norms[0] *= 1 - f * tol.grad_norm

    def grad(t, f):
        t.grads[0]["w"][3, 1] += f * grad_bound

    def weight(t, f):
        t.weights["w"][2, 2] += f * weight_bound

    def buffer(t, f):
        t.weights["stats"][5] -= f * buffer_bound

    return [
        (loss, "step 1 loss"),
        (norm, "step 0 grad norm"),
        (grad, "step 0 gradient of w"),
        (weight, "updated weight w"),
        (buffer, "updated buffer stats"),
    ]


@pytest.mark.parametrize("tolerance", list(TOLERANCES))
def test_each_check_fires_just_beyond_its_bound_and_not_within(tolerance):
    ref = _reference()
    for change, message in _changes(tolerance):
        with pytest.raises(TraceMismatch, match=message):
            assert_traces_match(ref, _perturbed(lambda t, change=change: change(t, 1.5)), tolerance=tolerance)
        worst = assert_traces_match(ref, _perturbed(lambda t, change=change: change(t, 0.5)), tolerance=tolerance)
        assert 0.3 < max(worst.values()) < 0.7, (message, worst)


def test_a_checked_gradient_difference_allows_what_adam_makes_of_it_and_no_more():
    ref, tol = _reference(), TOLERANCES["fp32"]
    step = 0.5 * tol.grad * ref.grads[0]["w"].abs().max().item()  # within the gradient bound
    allowed = ADAM_SLACK * 2 * 3e-3 / 1e-5 * step  # both steps see the gap: ADAM_SLACK · Σ reach · |Δg|

    def moved(scale):
        def change(t):
            t.grads[0]["w"][0, 0] += step
            t.weights["w"][0, 0] += scale * allowed

        return _perturbed(change)

    assert_traces_match(ref, moved(0.9), tolerance="fp32")
    with pytest.raises(TraceMismatch, match="updated weight w"):
        assert_traces_match(ref, moved(1.2), tolerance="fp32")
