"""What a training run records for the layout-equivalence checks, and the check itself.

A layout must reproduce the single-process reference: per-step loss and global grad norm, every
parameter's gradient before clipping and the optimizer, and the updated weights (and buffers).

Why the bounds hold on any CPU: the model runs in float64 wherever DeepSpeed allows it (ZeRO 0-2;
`tests/parallel/common.py`), so two layouts' different reduction orders differ at 1e-16, not at
float32's 1e-7 that the CPU's kernels (AVX-512, AVX2, MKL's reduction order) shape differently.
What float64 cannot remove is DeepSpeed's own float32: ZeRO-1/2 keep float32 master weights and
reduce gradients in float32, and ZeRO-3 builds float32 parameters (zero.Init accepts no float64).

Adam turns a tiny gradient difference into a large weight difference wherever a gradient is near
zero (it divides by the gradient's own magnitude), so weights are not compared with a fixed bound:
gradients are compared first, tightly, and each weight element may then differ by what Adam can
make of its checked gradient differences, `ADAM_SLACK Σ_t lr c_t max_{s≤t}|Δg_s| / (sqrt(v̂_t) + eps)` (c_t:
the clipping factor, v̂_t: Adam's second moment in the reference), plus a rounding term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ADAM_SLACK = 3.0
"""Through the first moment a gradient change moves Adam's step by at most |Δg| / (sqrt(v̂) + eps), and
through the second moment by about as much again. Measured float32 weight differences reach 0.9 of the
sum with slack 1, so 3 leaves a margin of 3 that does not shrink on noisier kernels: the sum grows with them."""


class TraceMismatch(AssertionError):
    """A layout's trace is not the reference's within the tolerance (a real mismatch, not a crash)."""


@dataclass(frozen=True)
class Tolerance:
    """Bounds of one precision path; each is a relative error unless it says otherwise."""

    loss: float
    """Per-step loss, relative to the reference loss."""
    grad_norm: float
    """Per-step global gradient norm (before clipping), relative to the reference norm."""
    grad: float
    """Each gradient element, relative to the largest element of that parameter's reference gradient."""
    grad_floor: float
    """Each gradient element, relative to the largest reference gradient element of the step over all
    parameters (a parameter whose gradient nearly cancels out has rounding noise of the terms' size)."""
    weight: float
    """Each weight element, relative to the largest element of that reference weight (rounding)."""
    weight_floor: float
    """Each weight element, absolute (parameters that stay near zero)."""
    buffer: float
    """Each buffer element (SCA's statistics, HCMA's state: computed from activations, not stepped by
    the optimizer, so they inherit the weights' differences), relative to the largest reference element."""


TOLERANCES = {
    # float64 end to end (ZeRO-0; the test sets DeepSpeed's reduction dtype to float64). Measured worst:
    # loss 1e-12, grad norm 1e-10, gradients 1e-9 (float32 statistics in SCA's buffers and HCMA's
    # refresh), weights 3e-9, buffers 3e-8 of the largest element
    "fp64": Tolerance(
        loss=1e-10, grad_norm=1e-8, grad=1e-6, grad_floor=1e-9, weight=1e-6, weight_floor=1e-12, buffer=1e-6
    ),
    # float64 model under DeepSpeed's float32 gradient reduction and master weights (ZeRO-1/2, and its
    # float32 grad norm). Measured worst: loss 2e-9, grad norm 1e-7, gradients 3e-7, weights 7e-7
    "fp64-fp32-masters": Tolerance(
        loss=1e-7, grad_norm=2e-6, grad=2e-5, grad_floor=1e-7, weight=1e-5, weight_floor=1e-10, buffer=1e-5
    ),
    # float32 model (ZeRO-3, and ZeRO-1 with an embedding tied across stages): float32 reduction-order
    # noise, the part the CPU's kernels shape, is absorbed by the gradient bounds and the Adam term.
    # Measured worst: loss 8e-8, grad norm 4e-7, gradients 7e-5, weights 0.3 of the Adam-aware bound
    "fp32": Tolerance(
        loss=1e-5, grad_norm=1e-4, grad=1e-3, grad_floor=1e-5, weight=1e-5, weight_floor=1e-8, buffer=1e-3
    ),
}


@dataclass
class Trace:
    """One run's record (per rank; every rank holds the full tensors)."""

    losses: list = field(default_factory=list)
    """Per step: the mean micro-batch loss over the global batch."""
    grad_norms: list = field(default_factory=list)
    """Per step: the global gradient norm before clipping."""
    grads: list = field(default_factory=list)
    """Per step: {parameter name: full gradient reduced over DP, before clipping and the optimizer}."""
    weights: dict = field(default_factory=dict)
    """After the last step: {name: full parameter or persistent buffer}."""
    adam_reach: list = field(default_factory=list)
    """Reference only, per step: {parameter name: lr · clip factor / (sqrt(v̂) + eps)} elementwise."""
    tolerance: str = "fp64"
    """Key of TOLERANCES this run's precision path is checked with."""


def adam_reach(optimizer: torch.optim.Optimizer, names: dict, clip_factor: float) -> dict:
    """How far one Adam step moves each element per unit of gradient change (after the step)."""
    out = {}
    for group in optimizer.param_groups:
        beta2, eps, lr = group["betas"][1], group["eps"], group["lr"]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            v_hat = state["exp_avg_sq"].double() / (1.0 - beta2 ** float(state["step"]))
            out[names[param]] = (lr * clip_factor / (v_hat.sqrt() + eps)).cpu()
    return out


def assert_traces_match(ref: Trace, got: Trace, what: str = "", tolerance: str | None = None) -> dict:
    """Raise TraceMismatch unless `got` reproduces `ref`; returns each check's worst error / bound
    (above 1 fails). Every check runs before it raises, so the message lists all that failed."""
    tol = TOLERANCES[tolerance or got.tolerance]
    worst = dict(loss=0.0, grad_norm=0.0, grad=0.0, weight=0.0, buffer=0.0)
    failures: list[str] = []

    def check(kind: str, err: float, bound, message: str) -> None:
        worst[kind] = max(worst[kind], err / bound)
        if err > bound:
            failures.append(message)

    if len(got.losses) != len(ref.losses) or len(got.grads) != len(ref.grads):
        failures.append(f"ran {len(got.losses)} steps ({len(got.grads)} optimizer steps), reference {len(ref.losses)}")
    for step, (a, b) in enumerate(zip(ref.losses, got.losses)):
        check("loss", abs(a - b), tol.loss * abs(a), f"step {step} loss {b!r} != reference {a!r}")
    for step, (a, b) in enumerate(zip(ref.grad_norms, got.grad_norms)):
        check("grad_norm", abs(a - b), tol.grad_norm * abs(a), f"step {step} grad norm {b!r} != reference {a!r}")

    gap: dict = {}  # per parameter: largest |Δg| so far, elementwise
    adam_term: dict = {}
    for step, (ref_grads, got_grads) in enumerate(zip(ref.grads, got.grads)):
        if set(ref_grads) != set(got_grads):
            failures.append(f"step {step} gradients of other parameters: {sorted(set(ref_grads) ^ set(got_grads))[:5]}")
            continue
        largest = max(g.abs().max().item() for g in ref_grads.values())
        for name, g_ref in ref_grads.items():
            g_got = got_grads[name]
            if g_got.shape != g_ref.shape:
                failures.append(f"step {step} gradient of {name}: shape {tuple(g_got.shape)} != {tuple(g_ref.shape)}")
                continue
            diff = (g_got.double() - g_ref.double()).abs()
            bound = tol.grad * g_ref.abs().max().item() + tol.grad_floor * largest
            err = diff.max().item()
            check("grad", err, bound, f"step {step} gradient of {name} differs by {err:.3g} (bound {bound:.3g})")
            gap[name] = torch.maximum(gap[name], diff) if name in gap else diff
            if name in ref.adam_reach[step]:
                adam_term[name] = adam_term.get(name, 0.0) + ADAM_SLACK * ref.adam_reach[step][name] * gap[name]

    if set(ref.weights) != set(got.weights):
        failures.append(f"parameter names differ: {sorted(set(ref.weights) ^ set(got.weights))[:5]}")
    params = set().union(*ref.grads)
    for name in sorted(set(ref.weights) & set(got.weights)):
        w_ref, w_got = ref.weights[name].double(), got.weights[name].double()
        if w_got.shape != w_ref.shape:
            failures.append(f"{name} shape {tuple(w_got.shape)} != {tuple(w_ref.shape)}")
            continue
        if not w_ref.numel():
            continue
        kind = "weight" if name in params else "buffer"
        scale = w_ref.abs().max()
        if kind == "weight":
            bound = tol.weight * scale + tol.weight_floor + adam_term.get(name, 0.0)
        else:
            bound = tol.buffer * scale + tol.weight_floor
        diff, bound = (w_got - w_ref).abs().flatten(), torch.as_tensor(bound).expand_as(w_ref).flatten()
        at = int((diff / bound).argmax())
        err, limit = diff[at].item(), bound[at].item()
        check(kind, err, limit, f"updated {kind} {name} differs by {err:.3g} (bound {limit:.3g})")
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        error = TraceMismatch(f"{what} {failures[0]}{more}".strip())
        error.failures, error.worst = failures, worst
        raise error
    return worst
