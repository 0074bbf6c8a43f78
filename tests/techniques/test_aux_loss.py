import pytest
import torch

from loom.techniques.aux_loss import attach_aux_loss, set_aux_loss_scale


@pytest.fixture(autouse=True)
def _restore_scale():
    yield
    set_aux_loss_scale(1.0)


def test_forward_is_identity_and_backward_adds_scaled_aux_grad():
    w = torch.randn(3, requires_grad=True)
    h = torch.randn(4, 3, requires_grad=True)
    hidden = h * 2.0
    aux = (w**2).sum()
    out = attach_aux_loss(hidden, aux)
    assert torch.equal(out, hidden)
    set_aux_loss_scale(0.25)  # read at backward time, like Megatron's MoEAuxLossAutoScaler
    out.sum().backward()
    assert torch.allclose(h.grad, torch.full_like(h, 2.0))
    assert torch.allclose(w.grad, 0.25 * 2 * w.detach())


def test_default_scale_and_tensor_scale():
    w = torch.ones(2, requires_grad=True)
    attach_aux_loss(torch.zeros(2, requires_grad=True), (w * w).sum()).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 2.0))  # scale 1 until a step sets one
    w.grad = None
    set_aux_loss_scale(torch.tensor(0.5))
    attach_aux_loss(torch.zeros(2, requires_grad=True), w.sum()).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 0.5))


def test_gradient_reaches_trunk_below():
    trunk = torch.randn(5, requires_grad=True)
    hidden = trunk * 3.0
    out = attach_aux_loss(hidden, hidden.pow(2).sum())  # aux loss depends on the trunk too
    out.sum().backward()
    assert torch.allclose(trunk.grad, 3.0 + 2 * hidden.detach() * 3.0)
